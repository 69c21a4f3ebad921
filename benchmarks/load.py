"""A loopback load generator: N closed-loop clients, bounded by a request count and a duration."""

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

from benchmarks.cpu import CpuMeter
from benchmarks.report import Latency, LoadSummary, rnd


def percentiles_ms(seconds: list[float]) -> Latency:
    if not seconds:
        return Latency()
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return Latency(p50_ms=rnd(p50), p95_ms=rnd(p95), p99_ms=rnd(p99), max_ms=rnd(max(seconds) * 1000))


@dataclass(frozen=True)
class Upload:
    """A ``POST /predict`` body encoded once: the load generator only sends bytes, so its own CPU
    use (which shares the machine with the server) stays small."""

    body: bytes
    content_type: str

    @classmethod
    def of(cls, data: bytes, filename: str = "image.jpg") -> "Upload":
        request = httpx.Request("POST", "http://127.0.0.1/", files={"file": (filename, data, "image/jpeg")})
        return cls(request.read(), request.headers["Content-Type"])


@dataclass
class Outcome:
    status: int | str  # HTTP status, or "exc:<type>" when no response came
    seconds: float
    timings: dict[str, Any] | None = None
    detail: str = ""


def _request(connection: http.client.HTTPConnection, upload: Upload, headers: dict[str, str]) -> Outcome:
    started = time.perf_counter()
    try:
        connection.request("POST", "/predict", body=upload.body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        seconds = time.perf_counter() - started
        body = json.loads(data)
        if response.status == 200:
            return Outcome(200, seconds, body["results"][0].get("timings"))
        return Outcome(response.status, seconds, detail=str(body.get("detail", "")))
    except (OSError, http.client.HTTPException, ValueError) as exc:
        connection.close()  # reconnects on the next request
        return Outcome(f"exc:{type(exc).__name__}", time.perf_counter() - started)


def run_load(
    url: str,
    upload: Upload,
    concurrency: int,
    max_requests: int,
    duration_s: float,
    timeout_s: float = 120,
    retry_after_s: float = 0.0,
) -> tuple[list[Outcome], float]:
    """``concurrency`` closed-loop clients (each sends its next request when its last one is
    answered, no think time) until ``max_requests`` were sent or ``duration_s`` passed.

    Plain ``http.client`` keep-alive connections, one per client thread: on 2 cores the load
    generator shares the CPU with the server, and httpx costs several times more CPU per request,
    which the server then lacks."""
    target = urlsplit(url)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    sent = 0
    deadline = time.monotonic() + duration_s
    headers = {"Content-Type": upload.content_type, "Content-Length": str(len(upload.body))}

    def client_loop() -> None:
        nonlocal sent
        connection = http.client.HTTPConnection(
            target.hostname or "127.0.0.1", target.port, timeout=timeout_s
        )
        try:
            while True:
                with lock:
                    if sent >= max_requests or time.monotonic() >= deadline:
                        return
                    sent += 1
                outcome = _request(connection, upload, headers)
                with lock:
                    outcomes.append(outcome)
                if retry_after_s and outcome.status == 503:
                    time.sleep(retry_after_s)
        finally:
            connection.close()

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(duration_s + timeout_s + 30)
    return outcomes, time.perf_counter() - started


def summarise(outcomes: list[Outcome], wall_s: float) -> LoadSummary:
    ok = [o for o in outcomes if o.status == 200]
    timings = [o.timings for o in ok if o.timings]

    def median_of(key: str) -> float | None:
        values = [t[key] for t in timings if key in t]
        return rnd(float(np.median(values))) if values else None

    batch = [t["batch_images"] for t in timings if "batch_images" in t]
    return LoadSummary(
        requests=len(outcomes),
        ok=len(ok),
        errors=dict(Counter(str(o.status) for o in outcomes if o.status != 200)),
        wall_s=rnd(wall_s, 3),
        images_per_s=rnd(len(ok) / wall_s) if wall_s > 0 else None,
        **percentiles_ms([o.seconds for o in ok]).model_dump(),
        server_decode_ms=median_of("decode_ms"),
        server_preprocess_ms=median_of("preprocess_ms"),
        server_inference_ms=median_of("inference_ms"),
        mean_batch_images=rnd(float(np.mean(batch))) if batch else None,
    )


def load_point(
    url: str, server_pid: int | None, upload: Upload, concurrency: int, requests: int, duration_s: float
) -> LoadSummary:
    """One measurement: the load's outcomes and where the machine's CPU went meanwhile. Server +
    client near 100 % of the machine: the point was CPU-bound (the load generator's share was
    taken from the server); a large "other": it was disturbed by other work."""
    meter = CpuMeter(server_pid)
    outcomes, wall = run_load(url, upload, concurrency, requests, duration_s)
    summary = summarise(outcomes, wall)
    usage = meter.read(summary.ok)
    return summary.model_copy(update=usage.model_dump(exclude_none=True))


def warm_up(url: str, upload: Upload, concurrency: int) -> None:
    # One burst at the largest concurrency: the first big batched call allocates its buffers.
    run_load(url, upload, concurrency, concurrency, 60)
