"""The service on Ray Serve against the one-host server, side by side on this machine, and an
activation under load on Serve: one run, one JSON report.

    python -m benchmarks.serve_cluster [--weights DIR] [--concurrency N] [--requests N]
        [--duration S] [--nodes N] [--out FILE]

(1) ``alexnet-serve`` (its fronts and engine process, benchmarks/server.py), then (2) the same
settings deployed on a local Ray cluster (``service.cluster``: Serve's proxy, front replicas, one
engine replica), each with ``POST /predict`` at concurrency 1 (the latency Serve adds per request)
and at ``--concurrency`` (throughput); then (3) ``POST /model/activate`` on Serve while clients
post, timing until every answer names the new model, and counting failed requests. Targets:
Serve's throughput >= 0.8 x the one-host server's; activation seen everywhere <= 2 s after the
answer, with 0 failed requests. Needs the `cluster` extra (ray[serve]) and, without ``--weights``,
torch to export two random models.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.images import sample_images
from benchmarks.load import Upload, load_point, warm_up
from benchmarks.ray_cluster import local_cluster
from benchmarks.report import add_out_option, rnd, write_report
from benchmarks.server import export_random_model, free_port, server_process

FIRST, OTHER = "alexnet-benchmark-random", "alexnet-benchmark-other"
KEY = "benchmark-key"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve_cluster", description=__doc__)
    parser.add_argument("--weights", type=Path, help=f"a folder holding {FIRST}.onnx and {OTHER}.onnx")
    parser.add_argument("--concurrency", type=int, default=8, help="clients for the throughput point")
    parser.add_argument("--requests", type=int, default=160, help="requests per point at most")
    parser.add_argument("--duration", type=float, default=60, help="seconds per point at most")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the local Ray cluster")
    add_out_option(parser)
    return parser.parse_args(argv)


def models(weights: Path | None) -> Path:
    if weights is not None:
        return weights
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    folder = Path(tempfile.mkdtemp(prefix="serve-cluster-bench-"))
    export_random_model(folder, f"{FIRST}.onnx")
    export_onnx(random_weights("torchvision", seed=1), folder / f"{OTHER}.onnx", version=OTHER)
    return folder


def settings_for(weights: Path) -> dict[str, Any]:
    return {
        "weights_dir": weights,
        "model": FIRST,
        "providers": ["CPUExecutionProvider"],
        "api_key": KEY,
        "max_queue_images": 256,
        "request_timeout_s": 120,
    }


def points(url: str, upload: Upload, args: argparse.Namespace) -> dict[str, Any]:
    warm_up(url, upload, args.concurrency)
    one = load_point(url, None, upload, 1, args.requests // 4, args.duration)
    many = load_point(url, None, upload, args.concurrency, args.requests, args.duration)
    return {"concurrency_1": one.model_dump(), f"concurrency_{args.concurrency}": many.model_dump()}


def one_host(weights: Path, upload: Upload, args: argparse.Namespace) -> dict[str, Any]:
    values = {key: ",".join(v) if isinstance(v, list) else v for key, v in settings_for(weights).items()}
    with server_process(values, timeout_s=300) as server:
        return points(server.url, upload, args)


def activation(url: str, upload: Upload, clients: int) -> dict[str, Any]:
    """Clients posting while the other model is activated: seconds until every answer names it."""
    answers: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post("/predict", content=upload.body, headers={"Content-Type": upload.content_type})
                    answers.append((sent, r.status_code, r.json().get("model_version", "")))
                except httpx.HTTPError as exc:
                    answers.append((sent, 0, repr(exc)))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    started = time.monotonic()
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/model/activate", json={"version": OTHER}, headers=auth, timeout=300)
    answered = time.monotonic()
    time.sleep(5)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    late = [(sent, v) for sent, code, v in answers if code == 200 and sent > answered]
    old_after = [sent - answered for sent, v in late if v != OTHER]
    return {
        "status": r.status_code,
        "answer_s": rnd(answered - started, 3),
        "requests": len(answers),
        "failed": sum(1 for _, status, _ in answers if status != 200),
        "old_model_sent_after_answer_max_s": rnd(max(old_after, default=0.0), 3),
    }


def on_serve(weights: Path, upload: Upload, args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    from service.cluster.app import deploy
    from service.core.config import Settings

    port = free_port()
    extra = {"port": port, "ray_engines": 1, "ray_proxy_location": "HeadOnly"}
    settings = Settings(_env_file=None, **settings_for(weights), **extra)
    with local_cluster(nodes=args.nodes, cpus=1):
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        started = time.perf_counter()
        deploy(settings, f"{FIRST}.onnx")
        report = {"deploy_s": rnd(time.perf_counter() - started, 1)}
        url = f"http://127.0.0.1:{port}"
        report |= points(url, upload, args)
        report["activation"] = activation(url, upload, min(4, args.concurrency))
        return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    weights = models(args.weights)
    upload = Upload.of(sample_images()["small"], "photo.jpg")
    single = one_host(weights, upload, args)
    cluster = on_serve(weights, upload, args)
    key = f"concurrency_{args.concurrency}"
    base, ours = single[key]["images_per_s"], cluster[key]["images_per_s"]
    ratio = rnd(ours / base, 3) if base and ours else None
    overhead = cluster["concurrency_1"]["p50_ms"] - single["concurrency_1"]["p50_ms"]
    act = cluster["activation"]
    report = {
        "one_host": single,
        "serve": cluster,
        "throughput_ratio": ratio,
        "serve_overhead_p50_ms": rnd(overhead),
        "targets": {
            "throughput_ratio >= 0.8": ratio is not None and ratio >= 0.8,
            "activation <= 2 s": act["old_model_sent_after_answer_max_s"] <= 2.0,
            "activation 0 failed": act["failed"] == 0 and act["status"] == 200,
        },
    }
    write_report(json.dumps(report, indent=2), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
