"""The inference queue over real HTTP: health while predictions run, backpressure (503 before the
body is read), request timeouts, and dynamic batching."""

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import cpu_settings, serve
from tests.images import photo_jpeg


def test_health_answers_while_predictions_run(client: httpx.Client, server: str) -> None:
    import concurrent.futures

    data = photo_jpeg()

    def predict() -> int:
        with httpx.Client(base_url=server, timeout=120) as c:
            return c.post("/predict", files={"file": ("a.jpg", data)}).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(predict) for _ in range(16)]
        health = [client.get("/health") for _ in range(5)]
        statuses = [f.result() for f in futures]
    assert all(h.status_code == 200 for h in health)
    assert statuses == [200] * 16


def queue_images(c: httpx.Client) -> float:
    line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith("alexnet_queue_images "))
    return float(line.split()[1])


def test_full_queue_is_refused_before_the_body_is_read(imagenet_model_dir: Path) -> None:
    """Backpressure: while the queue is full, a new /predict gets 503 + Retry-After at once, from
    its headers alone; the connection stays usable, and the server serves again when it drains."""
    import socket
    import threading

    from tests.images import big_photo_jpeg

    big = big_photo_jpeg()
    settings = cpu_settings(imagenet_model_dir, max_files=16, max_queue_images=16, max_upload_mb=64)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=120) as c:
        # One request of 16 twelve-megapixel photos fills the queue for a while (16 decodes, then
        # one inference call of 160 crops).
        holder: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: holder.update(
                status=c.post("/predict", files=[("files", ("big.jpg", big))] * 16).status_code
            )
        )
        thread.start()
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(base_url=url, timeout=30) as probe:
            while queue_images(probe) < 16:
                assert thread.is_alive(), holder
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                # Only the headers: a 10 MB body is announced and never sent.
                sock.sendall(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
                )
                head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), head
            assert b"retry-after: 1" in head.lower()
            assert "server busy" in json.loads(body)["detail"]
            # A keep-alive client refused with a body: same answer, same connection reused after.
            refused = probe.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            thread.join(timeout=120)
            assert holder == {"status": 200}
            assert probe.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
            metrics = probe.get("/metrics").text
        assert 'alexnet_rejected_total{reason="queue_full"} 2.0' in metrics
        assert 'alexnet_requests_total{method="POST",route="/predict",status="503"} 2.0' in metrics
        assert queue_images(c) == 0


def test_request_timeout_is_a_503_and_frees_the_queue(imagenet_model_dir: Path) -> None:
    settings = cpu_settings(imagenet_model_dir, request_timeout_s=0.001)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        response = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "timed out after 0.001 s" in response.json()["detail"]
        assert 'alexnet_rejected_total{reason="timeout"} 1.0' in c.get("/metrics").text
        assert queue_images(c) == 0


@pytest.mark.parametrize("batching", [True, False], ids=["batching", "no-batching"])
def test_dynamic_batching_gathers_concurrent_requests_only(imagenet_model_dir: Path, batching: bool) -> None:
    """With a batch delay far longer than any request, concurrent requests share inference calls
    and a lone request still does not wait for the delay: the batcher only waits for images that
    are already admitted."""
    import concurrent.futures
    import time

    data = photo_jpeg()
    # A minute of delay against a bound of 20 s: waiting out the delay cannot pass, and a loaded
    # machine's slow inference cannot fail it.
    settings = cpu_settings(imagenet_model_dir, batching=batching, max_batch_delay_ms=60_000)
    with serve(settings) as url:

        def predict() -> tuple[int, int, float]:
            with httpx.Client(base_url=url, timeout=120) as c:
                started = time.monotonic()
                response = c.post("/predict", files={"file": ("a.jpg", data)})
                timings = response.json()["results"][0]["timings"]
                return response.status_code, timings["batch_images"], time.monotonic() - started

        status, batch, seconds = predict()
        assert (status, batch) == (200, 1) and seconds < 20, seconds
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: predict(), range(8)))
    assert all(status == 200 and seconds < 20 for status, _, seconds in results), results
    batches = [batch for _, batch, _ in results]
    assert max(batches) > 1 if batching else set(batches) == {1}, batches
