"""Admission by cost (issue 15, findings 1 and 2) and defaults that follow the machine (issue 11).

Real servers, real HTTP, real images made here: a 64 MP 16-bit PNG (small compressed, costly to
decode), a progressive JPEG with hundreds of scans, uploads stalled before their end. The engine
is a model file that costs nothing to run (``tests.free_model``), so that decoding is the cost.
Assertions are on states (status codes, /metrics gauges), polled in steps, not on durations.
"""

import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from alexnet_core.images import jpeg_scans
from alexnet_core.resources import cgroup_cpu_quota, memory_limit, usable_cpus
from tests.conftest import cpu_settings, serve
from tests.free_model import write_free_model
from tests.images import many_scans_jpeg, photo_jpeg
from tests.processes import ServerProcess, alive, server_subprocess, wait_until

MiB = 2**20


@pytest.fixture(scope="module")
def free_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    weights = tmp_path_factory.mktemp("free-weights")
    write_free_model(weights / "free.onnx")
    return weights


@pytest.fixture(scope="module")
def png64() -> bytes:
    """64 MP, 16-bit grey: about 100 KB of PNG that decodes into gigabytes of working memory."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8000, 8000), dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def gauge(client: httpx.Client, name: str) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def post(url: str, files: list[tuple[str, bytes]], results: dict[str, httpx.Response], key: str) -> None:
    with httpx.Client(base_url=url, timeout=300) as c:
        results[key] = c.post("/predict", files=[("files", (name, data)) for name, data in files])


def wait_for(predicate: object, steps: int = 600) -> None:
    """Poll (each step a /metrics round trip or a short sleep) until ``predicate()`` holds."""
    import time

    for _ in range(steps):
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("state not reached")


# --- defaults from the cores and memory this process may use ----------------------------------


def test_cgroup_limits_are_read(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text(f"{512 * MiB}\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    assert memory_limit(tmp_path) == 512 * MiB
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == 1


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset")
def test_thread_defaults_follow_cpu_affinity() -> None:
    """Pinned to one core, the server sizes its pools for one core, not for the host (two decode
    workers per core: one decodes while the other waits for its next image)."""
    code = (
        "from service.core.config import Settings; s = Settings(_env_file=None); "
        "print(s.preprocess_threads, s.decode_workers, s.intra_op_threads)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALEXNET_")}
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert pinned.stdout.split() == ["1", "2", "1"]


# --- cost of one image -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xda",
        b"\xff\xda",
        b"\xff\xda\xda\xff\xff\xda\xff",
        b"\x00" * (2**20 - 1) + b"\xff\xda",  # across the first chunk's edge
        b"\x00" * 2**20 + b"\xff\xda" + b"\xff" * 2**20 + b"\xda",
        bytes(np.random.default_rng(0).integers(0, 256, 3 * 2**20, dtype=np.uint8)),
    ],
    ids=["empty", "one byte", "one marker", "mixed", "chunk edge", "second chunk", "noise"],
)
def test_scan_count_is_the_markers_count(data: bytes) -> None:
    assert jpeg_scans(data) == data.count(b"\xff\xda")


def test_jpeg_with_too_many_scans_is_refused(free_dir: Path) -> None:
    data = many_scans_jpeg(300)
    assert jpeg_scans(data) == 300
    with serve(cpu_settings(free_dir)) as url, httpx.Client(base_url=url) as c:
        response = c.post("/predict", files={"file": ("scans.jpg", data)})
        assert response.status_code == 413, response.text
        assert "300 scans, over the limit of 64" in response.json()["detail"]


@pytest.mark.parametrize(
    ("limit", "reason"),
    [({"decode_memory_mb": 256}, "decode budget of 256 MiB"), ({"decode_timeout_s": 0.5}, "took over 0.5 s")],
    ids=["over-the-decode-budget", "over-the-decode-time-cap"],
)
def test_costly_image_is_refused_and_the_next_one_served(
    free_dir: Path, png64: bytes, limit: dict[str, float], reason: str
) -> None:
    """An image over the decode budget (refused from its header, weighed by a worker that is then
    told to drop it) or whose decode runs past the time cap (its worker is replaced) answers 413;
    nothing stays held and the next image is served."""
    with serve(cpu_settings(free_dir, **limit)) as url, httpx.Client(base_url=url) as c:
        response = c.post("/predict", files={"file": ("big.png", png64)})
        assert response.status_code == 413, response.text
        assert reason in response.json()["detail"]
        assert gauge(c, "alexnet_decodes_in_progress") == 0
        assert gauge(c, "alexnet_decode_bytes") == 0
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200


# --- work of a request that failed, timed out or went away stops -------------------------------


def test_budget_held_by_decodes_refuses_with_503_and_is_freed_when_they_end(
    free_dir: Path, png64: bytes
) -> None:
    """While one costly image decodes, another that would not fit the budget beside it gets 503 +
    Retry-After; once the first has finished, the budget is whole again."""
    settings = cpu_settings(free_dir, decode_memory_mb=2000, decode_timeout_s=300, request_timeout_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as c:
        results: dict[str, httpx.Response] = {}
        first = threading.Thread(target=post, args=(url, [("a.png", png64)], results, "first"))
        first.start()
        wait_for(lambda: gauge(c, "alexnet_decodes_in_progress") == 1)
        refused = c.post("/predict", files={"file": ("b.png", png64)})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "decode budget" in refused.json()["detail"]
        first.join()
        assert results["first"].status_code == 200, results["first"].text
        assert gauge(c, "alexnet_decode_bytes") == 0 and gauge(c, "alexnet_decodes_in_progress") == 0
        assert gauge(c, "alexnet_decode_budget_bytes") == 2000 * MiB


def test_timed_out_request_leaves_no_decode_running(free_dir: Path, png64: bytes) -> None:
    """Issue 15 finding 1: a request that times out stops its decodes (their workers are killed),
    so the next valid request is decoded at once instead of queueing behind them."""
    settings = cpu_settings(free_dir, request_timeout_s=2, decode_workers=2, decode_timeout_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as c:
        response = c.post("/predict", files=[("files", ("a.png", png64)), ("files", ("b.png", png64))])
        assert response.status_code == 503 and "timed out" in response.json()["detail"]
        assert gauge(c, "alexnet_decodes_in_progress") == 0
        assert gauge(c, "alexnet_decode_bytes") == 0 and gauge(c, "alexnet_queue_images") == 0
        # Served once the killed workers are replaced (before the fix: once both decodes had run).
        small = photo_jpeg()
        wait_for(lambda: c.post("/predict", files={"file": ("a.jpg", small)}).status_code == 200, steps=20)


def test_refused_image_cancels_the_other_decodes_of_its_request(free_dir: Path, png64: bytes) -> None:
    settings = cpu_settings(free_dir, decode_timeout_s=300, request_timeout_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as c:
        files = [
            ("files", ("a.png", png64)),
            ("files", ("b.png", png64)),
            ("files", ("c.txt", b"not an image")),
        ]
        response = c.post("/predict", files=files)
        assert response.status_code == 415 and "'c.txt'" in response.json()["detail"]
        assert gauge(c, "alexnet_decodes_in_progress") == 0 and gauge(c, "alexnet_decode_bytes") == 0


def test_disconnected_client_stops_its_decodes(free_dir: Path, png64: bytes) -> None:
    settings = cpu_settings(free_dir, decode_timeout_s=300, request_timeout_s=300)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=300) as c:
        request = httpx.Request("POST", url + "/predict", files={"file": ("a.png", png64)})
        body, content_type = request.read(), request.headers["content-type"]
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: gauge(c, "alexnet_decodes_in_progress") == 1)
        wait_for(lambda: gauge(c, "alexnet_decodes_in_progress") == 0, steps=20)  # within 1 s
        assert gauge(c, "alexnet_decode_bytes") == 0
        assert 'alexnet_rejected_total{reason="disconnected"} 1.0' in c.get("/metrics").text


# --- bytes held by uploads in progress -----------------------------------------------------------


UPLOAD_HEAD = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
PART_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'


@pytest.fixture
def stalled_uploads() -> Iterator[Callable[[str], list[socket.socket]]]:
    """``stall(url)``: two uploads to the server that declare 1 MiB each and stall after a few
    bytes, together 2 MiB held (closed at the end of the test, if not before)."""
    sockets: list[socket.socket] = []

    def stall(url: str) -> list[socket.socket]:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", port))
            sockets.append(sock)
            sock.sendall(UPLOAD_HEAD + f"Content-Length: {MiB}\r\n\r\n".encode() + PART_HEAD + b"\xff" * 1000)
        return sockets

    yield stall
    for sock in sockets:
        sock.close()


def test_uploads_in_progress_are_bounded_server_wide(free_dir: Path, stalled_uploads: Callable) -> None:
    """Issue 15 finding 2: uploads stalled short of their end hold their bytes; past the upload
    budget the next request is refused with 503 + Retry-After before its body is read, and the
    budget is freed when the stalled ones go away."""
    settings = cpu_settings(free_dir, max_upload_mb=1, upload_memory_mb=2)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        stalled = stalled_uploads(url)
        wait_for(lambda: gauge(c, "alexnet_upload_bytes") == 2 * MiB)
        refused = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "upload budget" in refused.json()["detail"]
        assert 'alexnet_rejected_total{reason="upload_memory"} 1.0' in c.get("/metrics").text
        for sock in stalled:
            sock.close()
        wait_for(lambda: gauge(c, "alexnet_upload_bytes") == 0)
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200


def test_a_chunked_upload_past_the_upload_budget_is_cut_off(
    free_dir: Path, stalled_uploads: Callable
) -> None:
    """A body with no Content-Length reserves its bytes as they arrive: once they do not fit the
    upload budget beside the uploads in progress, it is answered 503 + Retry-After mid-stream, its
    connection closed, and nothing stays reserved for it."""
    settings = cpu_settings(free_dir, max_upload_mb=1, upload_memory_mb=2)
    with serve(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        stalled = stalled_uploads(url)  # together they hold the whole budget
        wait_for(lambda: gauge(c, "alexnet_upload_bytes") == 2 * MiB)
        part = PART_HEAD + b"\xff" * 4096
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as sock:
            sock.sendall(
                UPLOAD_HEAD
                + b"Transfer-Encoding: chunked\r\n\r\n"
                + f"{len(part):x}\r\n".encode()
                + part
                + b"\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):  # the server closes the connection after its answer
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"retry-after: 1" in head.lower() and b"connection: close" in head.lower()
        assert "upload budget" in json.loads(body)["detail"]
        assert 'alexnet_rejected_total{reason="upload_memory"} 1.0' in c.get("/metrics").text
        assert gauge(c, "alexnet_upload_bytes") == 2 * MiB  # the stalled ones' only
        for sock in stalled:  # else the server's shutdown waits for their body timeout
            sock.close()


# --- the decode workers: waiting is load, not the image's cost; a pool that cannot start ---------


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def decode_workers(server: ServerProcess) -> list[int]:
    """The server's decode workers: the leaves of its process tree (forked by its fork server, or
    spawned by the server itself where TMPDIR is too long a path for the fork server's socket),
    less multiprocessing's resource tracker and killed ones not reaped yet."""
    leaves, todo = [], children(server.pid)
    while todo:
        pid = todo.pop()
        below = children(pid)
        todo += below
        if not below and alive(pid) and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            leaves.append(pid)
    return leaves


def test_a_valid_image_that_waits_past_the_decode_cap_is_served_or_503_never_413(
    free_dir: Path, tmp_path: Path
) -> None:
    """The only worker cannot run (SIGSTOP: what waiting for a core on a saturated host looks like
    to the image) while the wall clock passes the decode cap: the valid image is decoded once the
    worker runs again, or answered 503 + Retry-After when the request's timeout comes first."""
    # One process (ALEXNET_WORKERS=0): its pool is the one whose worker is stopped; each front
    # runs the same pool.
    settings = {"workers": 0, "decode_workers": 1, "decode_timeout_s": 0.5, "request_timeout_s": 4}
    with (
        server_subprocess(free_dir, tmp_path, wait_for="/ready", **settings) as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        (worker,) = decode_workers(server)
        os.kill(worker, signal.SIGSTOP)
        results: dict[str, httpx.Response] = {}
        waiting = threading.Thread(target=post, args=(server.url, [("a.jpg", photo_jpeg())], results, "a"))
        waiting.start()
        wait_for(lambda: gauge(c, "alexnet_decodes_in_progress") == 1)
        time.sleep(1.5)  # three times the cap
        os.kill(worker, signal.SIGCONT)
        waiting.join()
        assert results["a"].status_code == 200, results["a"].text
        os.kill(worker, signal.SIGSTOP)  # now for longer than the request may wait
        refused = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        assert "timed out" in refused.json()["detail"]
        # The stopped worker was killed with the request it held; its replacement serves.
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
        assert worker not in decode_workers(server)
        assert gauge(c, "alexnet_decode_workers_live") == 1


def test_no_decode_worker_can_start_ready_is_503_until_they_can(free_dir: Path, tmp_path: Path) -> None:
    """The decode workers killed (SIGKILL, as the OOM killer does) while the server cannot start
    new ones (no file descriptor left for their sockets): /ready answers 503 with the reason,
    /metrics counts no live worker, an image gets 503 + Retry-After; once processes can start
    again, the pool is whole and the server ready."""
    with (
        # One process (ALEXNET_WORKERS=0): its descriptor limit is the one lowered; each front
        # runs the same pool.
        server_subprocess(free_dir, tmp_path, wait_for="/ready", workers=0, decode_workers=2) as server,
        # One keep-alive connection, opened before the server runs out of descriptors.
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        assert c.get("/ready").status_code == 200 and gauge(c, "alexnet_decode_workers_live") == 2
        workers = decode_workers(server)
        assert len(workers) == 2, workers
        limits = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        try:
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not any(alive(pid) for pid in workers), 10, "the workers dead")
            ready = c.get("/ready")
            assert ready.status_code == 503, ready.text
            assert "no decode worker runs and none could be started" in ready.json()["reason"]
            assert gauge(c, "alexnet_decode_workers_live") == 0
            refused = c.post("/predict", files={"file": ("a.jpg", photo_jpeg())})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_NOFILE, limits)
        assert c.get("/ready").status_code == 200
        assert gauge(c, "alexnet_decode_workers_live") == 2
        assert c.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
