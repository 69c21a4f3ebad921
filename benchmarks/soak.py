"""Soak test: ``alexnet-serve`` under a steady mix of valid and hostile uploads for a long time.

    python -m benchmarks.soak [--minutes 10] [--concurrency 32] [--out FILE] [--model PATH]

Starts the server as a subprocess (``python -c "from service.cli import run; run()"``, configured
by ALEXNET_* variables only: CPU provider, a free loopback port, a model it exports itself with
random weights unless --model is given), then runs ``--concurrency`` closed-loop clients against
it: real photos as JPEG and PNG, several images in one request, a 12 MP JPEG now and then, and
hostile requests (truncated and random bytes, decompression-bomb headers, SVG, empty and missing
files, too many files, bad top_k, malformed multipart, bodies over the upload limit with and
without Content-Length).

Recorded: requests served, counts by status per request kind, p99 latency per minute, and the
server's RSS (/proc/<pid>/status VmRSS), open fds (/proc/<pid>/fd) and threads at start, after
warm-up, in the middle and at the end, and every few seconds in between.

Memory growth is the median RSS under load over the last quarter of the soak against the median
over its first quarter (after the warm-up): a leak is a trend under the same load. Idle RSS is
reported too but not judged: glibc keeps freed memory in its per-thread arenas (a 12 MP decode is
a 36 MB buffer, and its dynamic mmap threshold moves such buffers into the arenas after the first
free), so idle RSS depends on which thread last decoded what. Open fds and threads are compared
idle (clients gone, nothing in flight) after the warm-up and at the end: they must come back.

Exit status 1 if any response was a 5xx, a valid request failed without a response, the server
died, RSS under load grew by 10 % or more, or open fds or threads grew. Load only ever goes to
127.0.0.1; everything is bounded by --minutes.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.mix import MAX_FILES, MAX_UPLOAD_MB, Load, Outcome, request_kinds
from benchmarks.report import add_out_option, write_report
from benchmarks.server import ProcessStats, ServerProcess, export_random_model, model_settings, server_process

RSS_GROWTH_LIMIT = 0.10
Json = dict[str, Any]
_started = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _started:7.1f}s] {message}", file=sys.stderr, flush=True)


def p99_ms(seconds: list[float]) -> float | None:
    return round(float(np.percentile(np.asarray(seconds) * 1000, 99)), 1) if seconds else None


def idle_stats(server: ServerProcess, settle_s: float) -> ProcessStats:
    """Stats with nothing in flight, after the clients stopped and closed their connections.
    FastAPI runs sync dependencies in anyio's worker threads (up to 40), created on demand; a
    worker idle for 10 s exits when the next call finishes. Waiting that long and then making a
    call brings the pool back to its idle size, so that threads compare between samples."""
    time.sleep(settle_s)
    with httpx.Client(timeout=30) as client:
        for _ in range(2):
            client.get(f"{server.url}/ready")  # a sync dependency: its call prunes idle workers
    time.sleep(0.5)
    return server.stats()


def server_settings(model: Path, concurrency: int) -> dict[str, str]:
    return {
        **model_settings(model),
        "ALEXNET_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "ALEXNET_MAX_FILES": str(MAX_FILES),
        # Room for every client's largest request: backpressure (503) is the benchmark's subject,
        # not this one's; here any 5xx is a failure. A generous timeout for the same reason:
        # latency on a shared 2-core machine is noisy.
        "ALEXNET_MAX_QUEUE_IMAGES": str(max(64, concurrency * (MAX_FILES + 1))),
        "ALEXNET_REQUEST_TIMEOUT_S": "120",
    }


def run(args: argparse.Namespace) -> Json:
    kinds = request_kinds()
    duration = args.minutes * 60
    warm_up = args.warm_up_s if args.warm_up_s is not None else min(60.0, max(10.0, 0.2 * duration))
    with tempfile.TemporaryDirectory(prefix="alexnet-soak-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            log("exporting a random-weights model")
            model = export_random_model(workdir, "alexnet-soak-random.onnx")
        with server_process(server_settings(model, args.concurrency), workdir=workdir) as server:
            samples: dict[str, ProcessStats] = {"start": server.stats()}
            log(f"server {server.url} pid {server.pid}: {samples['start']}")

            log(f"warm-up: {warm_up:.0f} s at concurrency {args.concurrency}")
            warm = Load(server.url, kinds, args.concurrency, seed=1)
            warm.start()
            time.sleep(warm_up)
            warm.stop()
            samples["after_warm_up"] = idle_stats(server, args.settle_s)
            log(f"after warm-up (idle): {samples['after_warm_up']}")

            log(f"soak: {duration:.0f} s at concurrency {args.concurrency}")
            load = Load(server.url, kinds, args.concurrency, seed=2)
            started = time.monotonic()
            load.start()
            series: list[Json] = []
            next_sample = started
            middle_taken = False
            while (elapsed := time.monotonic() - started) < duration and server.alive():
                if time.monotonic() >= next_sample:
                    stats = server.stats()
                    series.append(
                        {"t_s": round(elapsed, 1), **stats.__dict__, "requests": len(load.outcomes)}
                    )
                    next_sample += min(10.0, duration / 40)
                if not middle_taken and elapsed >= duration / 2:
                    samples["middle"] = server.stats()
                    middle_taken = True
                    log(f"middle (under load): {samples['middle']}, {len(load.outcomes)} requests")
                time.sleep(0.2)
            load.stop()
            wall = time.monotonic() - started
            alive = server.alive()
            if alive:
                samples["end"] = idle_stats(server, args.settle_s)
                log(f"end (idle): {samples['end']}")
            health = None
            if alive:
                with httpx.Client(timeout=30) as client:
                    health = client.get(f"{server.url}/health").status_code
            server_log = server.output(20_000)
    return summarise(load.outcomes, started, wall, samples, series, alive, health, server_log, args, warm_up)


def minute_by_minute(outcomes: list[Outcome], started: float) -> list[Json]:
    minutes: dict[int, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        minutes[int((o.finished - started) // 60)].append(o)
    return [
        {
            "minute": m + 1,
            "requests": len(os_),
            "p99_ms_all": p99_ms([o.seconds for o in os_]),
            "p99_ms_200": p99_ms([o.seconds for o in os_ if o.status == "200"]),
            "errors_5xx": sum(o.status.startswith("5") for o in os_),
        }
        for m, os_ in sorted(minutes.items())
    ]


def summarise(
    outcomes: list[Outcome],
    started: float,
    wall: float,
    samples: dict[str, ProcessStats],
    series: list[Json],
    alive: bool,
    health: int | None,
    server_log: str,
    args: argparse.Namespace,
    warm_up: float,
) -> Json:
    by_status = Counter(o.status for o in outcomes)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind][o.status] += 1
    per_minute = minute_by_minute(outcomes, started)
    server_errors = sum(n for s, n in by_status.items() if s.startswith("5"))
    failed_valid = sum(1 for o in outcomes if not o.status[0].isdigit() and not o.expected)
    unexpected = Counter(f"{o.kind}: {o.status}" for o in outcomes if not o.expected)
    base, end = samples["after_warm_up"], samples.get("end")
    quarter = max(s["t_s"] for s in series) / 4 if series else 0
    first = [s["rss_mb"] for s in series if s["t_s"] <= quarter] or [s["rss_mb"] for s in series[:1]]
    last = [s["rss_mb"] for s in series if s["t_s"] >= 3 * quarter] or [s["rss_mb"] for s in series[-1:]]
    loaded = (float(np.median(first)), float(np.median(last))) if series else None
    growth = None if loaded is None else round(loaded[1] / loaded[0] - 1, 4)
    idle_change = None if end is None else round(end.rss_mb / base.rss_mb - 1, 4)
    failures = []
    if not alive:
        failures.append("the server died")
    if health not in (None, 200):
        failures.append(f"/health answered {health} after the soak")
    if server_errors:
        failures.append(f"{server_errors} responses were 5xx")
    if failed_valid:
        failures.append(f"{failed_valid} requests got no response where one was due")
    if growth is not None and growth >= RSS_GROWTH_LIMIT:
        failures.append(f"RSS under load grew {growth:.1%} (limit {RSS_GROWTH_LIMIT:.0%})")
    if end is not None and end.fds > base.fds:
        failures.append(f"open fds grew from {base.fds} to {end.fds}")
    if end is not None and end.threads > base.threads:
        failures.append(f"threads grew from {base.threads} to {end.threads}")
    return {
        "config": {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "warm_up_s": round(warm_up, 1),
            "model": str(args.model) if args.model else "exported here (random weights)",
            "cpu_count": os.cpu_count(),
        },
        "requests": len(outcomes),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(outcomes) / wall, 2) if wall else None,
        "served_200": by_status.get("200", 0),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        "unexpected": dict(unexpected.most_common()),
        "per_minute": per_minute,
        "process": {name: stats.__dict__ for name, stats in samples.items()},
        "rss_under_load_mb": {"first_quarter_median": loaded[0], "last_quarter_median": loaded[1]}
        if loaded
        else None,
        "rss_growth_under_load": growth,
        "rss_idle_change_after_warm_up": idle_change,
        "series": series,
        "server_log_errors": [
            line for line in server_log.splitlines() if "ERROR" in line or "Traceback" in line
        ][-20:],
        "failures": failures,
        "ok": not failures,
    }


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [header, *[[("" if v is None else str(v)) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human(report: Json) -> str:
    c = report["config"]
    out = [
        f"soak: {c['minutes']} min at concurrency {c['concurrency']} (warm-up {c['warm_up_s']} s), "
        f"{report['requests']} requests in {report['wall_s']} s ({report['requests_per_s']}/s), "
        f"{report['served_200']} served 200",
        "",
        "by status: " + ", ".join(f"{s}: {n}" for s, n in report["by_status"].items()),
        "",
        table(
            [[k, ", ".join(f"{s}: {n}" for s, n in c.items())] for k, c in report["by_kind"].items()],
            ["kind", "statuses"],
        ),
        "",
        table(
            [
                [m["minute"], m["requests"], m["p99_ms_all"], m["p99_ms_200"], m["errors_5xx"]]
                for m in report["per_minute"]
            ],
            ["minute", "requests", "p99 ms (all)", "p99 ms (200)", "5xx"],
        ),
        "",
        table(
            [[name, s["rss_mb"], s["fds"], s["threads"]] for name, s in report["process"].items()],
            ["server", "RSS MiB", "open fds", "threads"],
        ),
        f"RSS under load, median of the first and last quarter: {report['rss_under_load_mb']}, "
        f"growth {report['rss_growth_under_load']}; idle after warm-up -> end: "
        f"{report['rss_idle_change_after_warm_up']} (not judged, see the module docstring)",
    ]
    if report["unexpected"]:
        out += ["", "unexpected outcomes: " + json.dumps(report["unexpected"])]
    out += ["", "FAILED: " + "; ".join(report["failures"]) if report["failures"] else "OK"]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description=__doc__.split("\n\n", 1)[1].split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--minutes", type=float, default=10.0, help="length of the soak after warm-up (default 10)"
    )
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients (default 32)")
    add_out_option(p)
    p.add_argument("--model", type=Path, help="ONNX model to serve (default: export one with random weights)")
    p.add_argument(
        "--warm-up-s", type=float, help="warm-up before the baseline (default 20 %% of the soak, 10-60 s)"
    )
    p.add_argument(
        "--settle-s",
        type=float,
        default=11.0,
        help="idle wait before the idle samples (default 11: idle request-pool threads exit after 10 s)",
    )
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        p.error("--minutes must be > 0 and --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(human(report))
    write_report(json.dumps(report, indent=2), args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
