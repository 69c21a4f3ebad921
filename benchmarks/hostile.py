"""Hostile but valid load: a bounded attack on ``alexnet-serve`` over loopback.

    python -m benchmarks.hostile [--minutes 5] [--concurrency 32] [--model PATH] [--out FILE]
        [--setting ALEXNET_X=VALUE ...]

Starts the server (a random-weights export unless ``--model``), then for ``--minutes`` keeps
``--concurrency`` clients busy: most draw from a weighted mix of valid images (a small photo and a
12 MP JPEG), costly-but-valid images (a progressive JPEG at the pixel limit, a 64 MP 16-bit PNG of
about 120 KB, a 34-byte WebP whose header lies) and large JSON bodies to ``POST /train`` without a
key; the others send uploads that stall one byte short of their end. Meanwhile ``--idle`` idle
connections are held open (reopened when the server closes them). Sampled every half second: the
server's RSS (its whole process tree) and its ``/metrics`` gauges.

Reported: the count of 5xx other than 503, the valid small images' p99 and their share answered
200 vs 503, the RSS peak against the configured memory budget (read from ``/metrics`` when the
server exposes one, else from ``--setting``, else RSS only), the decodes still running 1 s after
the attack stops (from ``/metrics``), and the time the next valid request takes after the attack.
Exit status 1 on any 5xx other than 503, a dead server, or a next request slower than 1 s.
"""

import argparse
import json
import re
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.cpu import log
from benchmarks.images import big_jpeg, encoded, photo
from benchmarks.mix import Kind, Load, Outcome, multipart
from benchmarks.report import add_out_option, write_report
from benchmarks.server import ServerProcess, env_name, export_random_model, model_settings, server_process

MAX_PIXELS = 64_000_000  # the service's default
ANY_REFUSAL = frozenset({200, 400, 401, 403, 408, 413, 415, 422, 429, 503})
GAUGE = re.compile(r"budget|decod|upload|in_flight|queue|memory|connections", re.IGNORECASE)
COUNTER = re.compile(r"_(total|bucket|sum|count|created)(\{|$)")


# --------------------------------------------------------------------------- costly images


def progressive_jpeg(side: int = 7999) -> bytes:
    """A progressive JPEG just under the pixel limit: every coefficient is buffered before output."""
    rng = np.random.default_rng(3)
    small = Image.fromarray(rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8))
    return encoded(
        small.resize((side, side), Image.Resampling.BILINEAR), "JPEG", quality=40, progressive=True
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_16bit(side: int = 7999) -> bytes:
    """A real, complete 16-bit greyscale PNG of side x side pixels: flat, so about 120 KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + bytes(2 * side)  # filter byte, then 16-bit samples
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def lying_webp(side: int = 7999) -> bytes:
    """34 bytes: an extended WebP header announcing a side x side animation, and nothing else."""
    size = (side - 1).to_bytes(3, "little")
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x02, 0, 0, 0]) + size + size
    body = b"WEBP" + vp8x + b"ANIM"
    return b"RIFF" + struct.pack("<I", len(body)) + body


def attack_kinds(json_mb: int) -> list[Kind]:
    china = encoded(photo(), "JPEG", quality=90)

    def image(name: str, weight: float, valid: bool, filename: str, data: bytes) -> Kind:
        body, content_type = multipart([("file", filename, data)])
        return Kind(name, weight, valid, frozenset({200, 503} if valid else ANY_REFUSAL), body, content_type)

    big_json = json.dumps({"dataset": "x", "epochs": 1, "padding": "x" * (json_mb * 2**20)}).encode()
    return [
        image("valid-small", 40, True, "china.jpg", china),
        image("valid-12mp", 6, True, "big.jpg", big_jpeg()),
        image("progressive-jpeg-64mp", 5, False, "p.jpg", progressive_jpeg()),
        image("png-64mp-16bit", 5, False, "p.png", png_16bit()),
        image("webp-lying-header", 5, False, "w.webp", lying_webp()),
        Kind(
            "train-json-no-key",
            3,
            False,
            ANY_REFUSAL,
            big_json,
            "application/json",
            closed=True,
            path="/train",
        ),
    ]


# --------------------------------------------------------------------------- sockets


def stalled_uploads(port: int, body_mb: int, stop: threading.Event, held: list[float]) -> None:
    """Upload all but the last byte of a declared body, then wait (up to 60 s) for the server to
    give up; repeat until stopped. Records how long each connection was held."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.jpg"\r\n\r\n\xff\xd8\xff'
    length = body_mb * 2**20
    request = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
    request += "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
    while not stop.is_set():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                sock.sendall(request.encode() + head + bytes(length - len(head) - 1))
                while not stop.is_set() and time.monotonic() - started < 60:
                    sock.settimeout(0.5)
                    try:
                        if not sock.recv(65536):
                            break
                    except TimeoutError:
                        continue
        except OSError:
            pass
        held.append(time.monotonic() - started)


def idle_connections(port: int, count: int, stop: threading.Event, closed: list[int]) -> None:
    """Hold ``count`` connections that never send a byte; reopen those the server closes."""
    sockets: list[socket.socket] = []
    try:
        while not stop.is_set():
            alive = []
            for sock in sockets:
                try:
                    sock.setblocking(False)
                    gone = sock.recv(1) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    sock.close()
                    closed[0] += 1
                else:
                    alive.append(sock)
            sockets = alive
            while len(sockets) < count and not stop.is_set():
                try:
                    sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            stop.wait(1.0)
    finally:
        for sock in sockets:
            sock.close()


# --------------------------------------------------------------------------- the run


class Sampler(threading.Thread):
    """RSS of the server's process tree and its /metrics gauges, every half second."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server, self.stop = server, threading.Event()
        self.rss: list[float] = []
        self.gauges: dict[str, float] = {}  # peak of each gauge
        self.last: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.wait(0.5) and self.server.alive():
            try:
                self.rss.append(self.server.rss_mb())
                self.last = gauges(self.server)
            except (OSError, httpx.HTTPError):
                continue
            for name, value in self.last.items():
                self.gauges[name] = max(value, self.gauges.get(name, value))


def gauges(server: ServerProcess) -> dict[str, float]:
    return {
        k: v for k, v in server.metrics(timeout=5).items() if GAUGE.search(k) and not k.endswith("_total")
    }


def budget_mb(metrics: dict[str, float], idle_rss_mb: float | None) -> float | None:
    """What the server may hold: its idle footprint (model, runtime) plus the server-wide budgets
    it exposes for work in progress (``alexnet_decode_budget_bytes``, ``alexnet_upload_budget_bytes``)."""
    budgets = [value / 2**20 for name, value in metrics.items() if name.endswith("_budget_bytes")]
    if not budgets or idle_rss_mb is None:
        return None
    return idle_rss_mb + sum(budgets)


def decodes_running(metrics: dict[str, float]) -> float | None:
    values = [v for k, v in metrics.items() if "decodes_in_progress" in k]
    return sum(values) if values else None


def next_valid_request(url: str, data: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    response = httpx.post(f"{url}/predict", files={"file": ("a.jpg", data)}, timeout=60)
    return response.status_code, time.perf_counter() - started


def summary(outcomes: list[Outcome], **extra: Any) -> dict[str, Any]:
    statuses = Counter(o.status for o in outcomes)
    small = [o for o in outcomes if o.kind == "valid-small"]
    ok = [o.seconds for o in small if o.status == "200"]
    by_kind: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.status] += 1
    return {
        "requests": len(outcomes),
        "errors_5xx_except_503": sum(n for s, n in statuses.items() if s.startswith("5") and s != "503"),
        "no_response": sum(n for s, n in statuses.items() if s.startswith("exc:")),
        "valid_small": {
            "requests": len(small),
            "share_200": round(len(ok) / len(small), 4) if small else None,
            "share_503": round(sum(o.status == "503" for o in small) / len(small), 4) if small else None,
            "p99_ms_200": round(float(np.percentile(np.asarray(ok) * 1000, 99)), 1) if ok else None,
        },
        "by_kind": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        **extra,
    }


def attack(args: argparse.Namespace, server: ServerProcess, settings: dict[str, str]) -> dict[str, Any]:
    stop, held, closed = threading.Event(), [], [0]
    load = Load(server.url, attack_kinds(args.json_mb), max(1, args.concurrency - args.stalled), seed=5)
    helpers = [
        threading.Thread(target=stalled_uploads, args=(server.port, 8, stop, held), daemon=True)
        for _ in range(args.stalled)
    ]
    helpers.append(
        threading.Thread(target=idle_connections, args=(server.port, args.idle, stop, closed), daemon=True)
    )
    idle_rss = server.rss_mb()
    sampler = Sampler(server)
    sampler.start()
    log(
        f"attack: {args.minutes} min, {load.concurrency} mixed clients, {args.stalled} stalled, "
        f"{args.idle} idle"
    )
    started = time.monotonic()
    load.start()
    for thread in helpers:
        thread.start()
    while time.monotonic() - started < args.minutes * 60 and server.alive():
        time.sleep(0.5)
    stop.set()
    load.stop()
    for thread in helpers:
        thread.join(timeout=90)
    wall = time.monotonic() - started
    alive = server.alive()
    status, seconds = (
        next_valid_request(server.url, encoded(photo(), "JPEG", quality=90)) if alive else (0, 0.0)
    )
    time.sleep(1.0)
    after = gauges(server) if alive else {}
    sampler.stop.set()
    sampler.join(timeout=10)
    budget = budget_mb(sampler.last or after, idle_rss)
    peak = max(sampler.rss, default=None)
    return summary(
        load.outcomes,
        wall_s=round(wall, 1),
        server_alive=alive,
        rss_peak_mb=peak,
        idle_rss_mb=idle_rss,
        memory_budget_mb=budget,
        rss_peak_over_budget=round(peak / budget, 3) if peak and budget else None,
        stalled_uploads={"count": len(held), "held_s_max": round(max(held, default=0), 1)},
        idle_connections={"held": args.idle, "closed_by_server": closed[0]},
        decodes_running_1s_after=decodes_running(after),
        gauges_peak=sampler.gauges,
        gauges_1s_after=after,
        next_request={"status": status, "seconds": round(seconds, 3)},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.hostile", description=(__doc__ or "").split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--minutes", type=float, default=5.0, help="length of the attack (default 5)")
    p.add_argument("--concurrency", type=int, default=32, help="attacking clients in all (default 32)")
    p.add_argument(
        "--stalled", type=int, default=8, help="of those, clients sending stalled uploads (default 8)"
    )
    p.add_argument("--idle", type=int, default=200, help="idle connections held open besides (default 200)")
    p.add_argument(
        "--json-mb", type=int, default=20, help="size of the JSON bodies sent to /train (default 20)"
    )
    p.add_argument("--model", type=Path, help="ONNX model to serve (default: export one with random weights)")
    p.add_argument("--setting", action="append", default=[], metavar="ALEXNET_X=V", help="a server setting")
    add_out_option(p)
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 2 or not 0 <= args.stalled < args.concurrency:
        p.error("--minutes must be > 0, --concurrency >= 2 and 0 <= --stalled < --concurrency")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {env_name(k): v for k, v in (s.split("=", 1) for s in args.setting)}
    with tempfile.TemporaryDirectory(prefix="alexnet-hostile-") as tmp:
        model = args.model or export_random_model(Path(tmp) / "weights", "alexnet-hostile-random.onnx")
        with server_process({**model_settings(model), **settings}, workdir=Path(tmp) / "server") as server:
            report = attack(args, server, settings)
            report["settings"] = settings
            report["server_log_errors"] = [
                line for line in server.output(50_000).splitlines() if "ERROR" in line or "Traceback" in line
            ][-20:]
    failures = []
    if report["errors_5xx_except_503"]:
        failures.append(f"{report['errors_5xx_except_503']} responses were 5xx other than 503")
    if not report["server_alive"]:
        failures.append("the server died")
    if report["next_request"]["status"] != 200 or report["next_request"]["seconds"] > 1.0:
        failures.append(f"the next valid request after the attack: {report['next_request']}")
    report["failures"] = failures
    write_report(json.dumps(report, indent=2), args.out)
    log("OK" if not failures else "FAILED: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
