"""The inference queue over real HTTP: health while predictions run, backpressure (503 before the
body is read), request timeouts, and dynamic batching."""

import asyncio
import io
import json
import signal
import socket
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from alexnet_core.session import OnnxClassifier
from service.core.metrics import Metrics
from service.image_admission import ImageAdmission
from service.inference import InferenceQueue, InferenceResult, ServiceUnavailable
from tests.conftest import cpu_settings, serve
from tests.free_model import write_free_model
from tests.images import photo_jpeg
from tests.processes import ServerProcess, server_subprocess, wait_until


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


def gauge(c: httpx.Client, name: str) -> float:
    line = next(x for x in c.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def queue_images(c: httpx.Client) -> float:
    return gauge(c, "alexnet_queue_images")


def decodes_in_progress(c: httpx.Client) -> float:
    return gauge(c, "alexnet_decodes_in_progress")


def queue_images_of(server: ServerProcess) -> float:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        return queue_images(c)


def png_64_megapixels() -> bytes:
    """64 MP of 16-bit grey: about 100 KB of PNG that takes seconds to decode."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8000, 8000), dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


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


# --- the batcher's state machine: stop arriving in every state -----------------------------------


@pytest.fixture(scope="module")
def free_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxClassifier, OnnxClassifier]:
    """Two sessions of a model that costs nothing to run: two models, as after an activation."""
    path = write_free_model(tmp_path_factory.mktemp("free") / "free.onnx")
    return OnnxClassifier(path, ["CPUExecutionProvider"]), OnnxClassifier(path, ["CPUExecutionProvider"])


async def infer(queue: InferenceQueue, classifier: OnnxClassifier, images: int) -> InferenceResult:
    with queue.admission.admit(images) as admission:
        crops = np.zeros((images * 10, 3, 224, 224), np.float32)
        return await queue.infer(admission, classifier, crops)


async def batcher_at_work() -> None:
    """Time for the batcher thread to take what was queued (it then waits in its window, which is
    a minute long: this state lasts until the test acts)."""
    await asyncio.sleep(0.3)


@pytest.mark.parametrize("state", ["idle", "window", "held-other-model", "held-overfull", "cancelled"])
def test_stop_in_every_state_returns_at_once_and_resolves_every_job(
    free_models: tuple[OnnxClassifier, OnnxClassifier], state: str
) -> None:
    """The batcher told to stop while idle, while its batch window is open for images still
    decoding, while it holds a job for the next call (another model's, or one that would overfill
    the batch), or with a job whose request has gone: ``stop()`` returns at once, and no request is
    left waiting (each has its result or a 503, including one that arrives after the stop)."""
    first, other = free_models

    async def scenario() -> None:
        metrics = Metrics()
        admission = ImageAdmission(metrics, limit=64)
        queue = InferenceQueue(metrics, admission, batching=True, max_batch_images=4, max_batch_delay_s=60)
        queue.start()
        requests: list[asyncio.Task[InferenceResult]] = []
        with admission.admit(1) as coming:  # an image still decoding: the window stays open for it
            if state != "idle":
                requests.append(asyncio.create_task(infer(queue, first, 2)))
                await batcher_at_work()
            # Held: the first request's call runs without it, then it opens the next window.
            if state == "held-other-model":
                requests.append(asyncio.create_task(infer(queue, other, 1)))
            elif state == "held-overfull":
                requests.append(asyncio.create_task(infer(queue, first, 3)))
            elif state == "cancelled":
                requests[0].cancel()
            await batcher_at_work()
            if state == "window":
                assert not requests[0].done()  # in the batch the window gathers
            elif state.startswith("held"):
                assert requests[0].done() and not requests[1].done()
            started = time.monotonic()
            await asyncio.to_thread(queue.stop)
            assert time.monotonic() - started < 1.0
            done, pending = await asyncio.wait(requests, timeout=5) if requests else (set(), set())
            assert not pending, f"{len(pending)} requests left waiting"
            for task in done:
                assert task.cancelled() or isinstance(task.exception(), ServiceUnavailable | None), task
            # A request whose images finish decoding after the stop is refused, not left waiting.
            crops = np.zeros((10, 3, 224, 224), np.float32)
            with pytest.raises(ServiceUnavailable, match="shutting down"):
                await asyncio.wait_for(queue.infer(coming, first, crops), 1)

    asyncio.run(asyncio.wait_for(scenario(), 120))


def reset_after_sending(port: int, files: list[tuple[str, bytes]]) -> socket.socket:
    """A /predict request sent whole on a connection that will be reset (RST) when closed."""
    request = httpx.Request("POST", "http://x/predict", files=[("files", file) for file in files])
    body = request.read()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_sigterm_while_aborted_requests_left_the_batch_window_open_exits_at_once(tmp_path: Path) -> None:
    """A server process whose batcher waits in its window (an image was still decoding when a
    request's job arrived) and whose clients then reset their connections: SIGTERM ends it at once,
    not after the inference thread's join timeout."""
    write_free_model(tmp_path / "weights" / "free.onnx")
    slow = png_64_megapixels()  # seconds to decode
    # One process (ALEXNET_WORKERS=0): both requests' images decode side by side in its pool, so
    # the window opens for certain; the engine process runs the same batcher.
    settings = {"workers": 0, "decode_workers": 2, "decode_timeout_s": 300, "max_batch_delay_ms": 60_000}
    with server_subprocess(tmp_path / "weights", tmp_path, wait_for="/ready", **settings) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            decoding = reset_after_sending(server.port, [("slow.png", slow)])
            wait_until(lambda: queue_images(c) == 1, 30, "the slow image admitted")
            quick = reset_after_sending(server.port, [("a.jpg", photo_jpeg()), ("b.jpg", photo_jpeg())])
            # Both admitted, only the slow image still decoding: the quick one's job is in the window.
            wait_until(lambda: queue_images(c) == 3 and decodes_in_progress(c) == 1, 30, "the window open")
            time.sleep(0.3)
        quick.close()
        decoding.close()
        wait_until(lambda: queue_images_of(server) == 0, 30, "the aborted requests gone")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)
        assert time.monotonic() - started < 10, server.output(3000)
