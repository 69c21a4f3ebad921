"""Security and fault properties that only a real server process shows: what it logs, which files
and descriptors it holds, its memory. One ``alexnet-serve`` subprocess serves the whole module
(debug logging, an API key, its own TMPDIR and working directory); the tests that must signal or
kill a server start their own (tests/test_faults.py)."""

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.images import photo_jpeg
from tests.processes import ServerProcess, fd_count, link_model, rss_mb, server_subprocess, wait_until
from tests.test_security import AUTH, JOB_ID, KEY, MUTATIONS, TRAIN


@pytest.fixture(scope="module")
def server(imagenet_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Its data root is empty: an authenticated POST /train goes as far as the dataset lookup
    (400) and starts nothing."""
    root = tmp_path_factory.mktemp("server-process")
    weights, data = root / "weights", root / "data"
    link_model(imagenet_model_dir, weights)
    data.mkdir()
    with server_subprocess(weights, root, data, wait_for="/ready", api_key=KEY, log_level="debug") as server:
        yield server


def test_key_never_in_logs_or_responses(server: ServerProcess) -> None:
    """The whole output of a server at DEBUG level during authenticated and refused requests;
    then every readable endpoint."""
    wrong = "WRONG-attempt-9f8e7d"
    bodies = []
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for headers in (AUTH, {"Authorization": f"Bearer {wrong}"}, {}):
            for method, path, body in MUTATIONS:
                bodies.append(c.request(method, path, json=body, headers=headers).text)
            bodies.append(c.post("/train", json={**TRAIN, "dataset": "../x"}, headers=headers).text)
            bodies.append(c.post("/model/activate", json={"version": "nope"}, headers=headers).text)
        for path in ("/model", "/train", f"/train/{JOB_ID}", "/openapi.json", "/metrics", "/ready", "/docs"):
            bodies.append(c.get(path).text)
    output = server.output()
    assert re.search(r'"POST /model/activate HTTP/1.1" 200', output)  # requests were logged
    for secret in (KEY, wrong):
        assert secret not in output
        assert not [b for b in bodies if secret in b]


def regular_files_open(pid: int) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and not target.startswith(("/dev/", "/proc/")):
            links.append(target)
    return links


def test_uploads_stay_in_memory_and_leave_nothing_behind(server: ServerProcess) -> None:
    root = server.workdir.parent  # the fixture's folder: weights/, data/ and the server's workdir
    folders = [root / "weights", root / "data", server.workdir]
    snapshot = {p: sorted(x.name for x in p.iterdir()) for p in folders}
    before = set(regular_files_open(server.pid))
    # ONNX Runtime leaves a session-id file (.ses) in TMPDIR at start-up: the server's own.
    tmp_before = sorted(server.tmpdir.iterdir())
    # An upload in progress, over Starlette's default 1 MiB in-memory spool: the service raises the
    # spool to the body limit, so even this one is written nowhere.
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        request = (
            f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {6 * 2**20}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
        )
        sock.sendall(request.encode() + head + os.urandom(3 * 2**20))
        time.sleep(1.0)
        assert set(regular_files_open(server.pid)) - before == set()
        assert sorted(server.tmpdir.iterdir()) == tmp_before
    with httpx.Client(base_url=server.url, timeout=60) as c:
        big = photo_jpeg() + os.urandom(2 * 2**20)  # a JPEG with trailing bytes: decodes fine
        assert c.post("/predict", files={"file": ("a.jpg", big)}).status_code == 200
        assert c.post("/predict", files={"file": ("a.jpg", os.urandom(2 * 2**20))}).status_code == 415
    time.sleep(0.5)
    assert set(regular_files_open(server.pid)) <= before
    assert sorted(server.tmpdir.iterdir()) == tmp_before
    # Nothing of the uploads anywhere else (the job store files are the server's own).
    assert {p: sorted(x.name for x in p.iterdir()) for p in folders} == snapshot


def abandoned_upload(url: str, declared: int, sent: int) -> None:
    """Headers declaring ``declared`` body bytes, ``sent`` of them, then the connection closed."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        request = (
            f"POST /predict HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n"
        )
        sock.sendall(request.encode())
        sock.sendall(head + b"\xff\xd8\xff" + os.urandom(sent - len(head) - 3))
        time.sleep(0.05)  # let the server buffer it before the connection goes


def test_client_gone_mid_upload_leaks_no_files_fds_or_memory(server: ServerProcess) -> None:
    spool = server.tmpdir
    spool_before = sorted(spool.iterdir())  # ONNX Runtime's session-id file (.ses), not ours
    pid = server.pid
    with httpx.Client(base_url=server.url, timeout=60) as api:
        assert api.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
    # (closed: no keep-alive connection of ours among the fds counted below)

    def settled_fds() -> int:
        time.sleep(0.5)
        return fd_count(pid)

    # Over Starlette's default 1 MiB spool; the service keeps uploads up to its body limit in
    # memory, so a leaked buffer would show in the RSS, a leaked temp file in TMPDIR.
    abandoned_upload(server.url, 8 * 2**20, 3 * 2**20)
    fds, rss = settled_fds(), rss_mb(pid)
    for _ in range(30):
        abandoned_upload(server.url, 8 * 2**20, 3 * 2**20)
    assert wait_until(lambda: settled_fds() <= fds, 10, f"fds back to {fds} (now {fd_count(pid)})")
    assert rss_mb(pid) < rss + 50, (rss, rss_mb(pid))  # 30 x 3 MiB would be 90 MiB
    assert sorted(spool.iterdir()) == spool_before
    with httpx.Client(base_url=server.url, timeout=60) as again:
        assert again.post("/predict", files={"file": ("a.jpg", photo_jpeg())}).status_code == 200
    assert server.alive()
    assert sorted(spool.iterdir()) == spool_before
