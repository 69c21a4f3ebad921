"""``alexnet-serve``'s processes for real: front processes on one port, one engine process, killed
and stopped under load over real HTTP. A front killed is replaced while the other serves; an engine
killed fails its requests with 503 at once and comes back with the active model; SIGTERM drains
every process; the state (model, gallery, jobs) is one per server whichever front a client hits."""

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from benchmarks.server import ServerProcess, server_process
from tests.images import encode, photo
from tests.processes import alive, wait_until

KEY = "process-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SMALL = {"input_size": 64, "resize_size": 73}  # a small model: quick to export and to run


def export_small(path: Path, seed: int) -> Path:
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    weights = random_weights("paper", seed=seed, num_classes=10)
    export_onnx(weights, path, input_kind="square", version=path.stem, **SMALL)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small square-kind models (with features): ``small-a`` (served first) and ``small-b``."""
    folder = tmp_path_factory.mktemp("small-models")
    export_small(folder / "small-a.onnx", seed=1)
    export_small(folder / "small-b.onnx", seed=2)
    return folder


def weights_dir(models: Path, tmp_path: Path) -> Path:
    weights = tmp_path / "weights"
    weights.mkdir()
    for model in models.glob("*.onnx"):
        os.link(model, weights / model.name)
    (weights / "ACTIVE").write_text("small-a.onnx")
    return weights


@contextmanager
def fronted_server(weights: Path, tmp_path: Path, **settings: object) -> Iterator[ServerProcess]:
    values = {"weights_dir": weights, "workers": 2, "api_key": KEY, "log_level": "info", **settings}
    with server_process(values, workdir=tmp_path / "server", timeout_s=300, graceful=False) as server:
        wait_until(lambda: len(titled(server.pid, "front")) == 2, 60, "two fronts")
        yield server


def titled(root: int, kind: str) -> list[int]:
    """Processes below ``root`` named ``alexnet-serve: <kind>...`` (setproctitle)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if title.startswith(f"alexnet-serve: {kind}") and _descends(int(entry.name), root) and stat[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def _descends(pid: int, root: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


class Load:
    """Clients posting /predict in a loop: each answer's status, version and start/end times."""

    def __init__(self, url: str, clients: int = 4, fresh_connections: bool = False) -> None:
        self.url, self.fresh = url, fresh_connections
        self.image = encode(photo().resize((320, 213)), "JPEG")
        self.answers: list[tuple[int, str, float, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _post(self, client: httpx.Client) -> None:
        started = time.monotonic()
        try:
            r = client.post("/predict", files={"file": ("a.jpg", self.image, "image/jpeg")})
            what = r.json().get("model_version", "") if r.status_code == 200 else r.text
            if "retry-after" in r.headers:
                what += " [Retry-After]"
            self.answers.append((r.status_code, what, started, time.monotonic()))
        except httpx.HTTPError as exc:  # a connection to a front that was killed
            self.answers.append((0, repr(exc), started, time.monotonic()))

    def _run(self) -> None:
        while not self.stop.is_set():
            with httpx.Client(base_url=self.url, timeout=60) as client:
                while not self.stop.is_set():
                    self._post(client)
                    if self.fresh:
                        break

    def wait_for(self, count: int, status: int = 200, timeout: float = 120) -> None:
        def enough() -> bool:
            return sum(1 for a in self.answers if a[0] == status) >= count

        wait_until(enough, timeout, f"{count} answers {status}", interval=0.05)


def test_a_killed_front_is_replaced_while_the_other_serves(models: Path, tmp_path: Path) -> None:
    with fronted_server(weights_dir(models, tmp_path), tmp_path) as server, Load(server.url) as load:
        load.wait_for(5)
        victim = titled(server.pid, "front 0")[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        replaced = wait_until(
            lambda: [p for p in titled(server.pid, "front 0") if p != victim], 60, "front 0"
        )
        before = len(load.answers)
        load.wait_for(sum(1 for a in load.answers if a[0] == 200) + 20)
        after_kill = [a for a in load.answers if a[2] >= killed_at]
    assert replaced and not alive(victim)
    assert all(status in (0, 200) for status, *_ in load.answers), [
        a for a in load.answers if a[0] not in (0, 200)
    ]
    assert all(a[0] == 200 for a in load.answers[before:]), "requests failed after the front was replaced"
    assert any(a[0] == 200 for a in after_kill), "the other front stopped serving"


def test_a_killed_engine_fails_requests_at_once_and_comes_back(models: Path, tmp_path: Path) -> None:
    weights = weights_dir(models, tmp_path)
    with fronted_server(weights, tmp_path) as server:
        activated = httpx.post(
            f"{server.url}/model/activate", json={"version": "small-b"}, headers=AUTH, timeout=60
        )
        assert activated.status_code == 200, activated.text
        with Load(server.url) as load:
            load.wait_for(5)
            (engine,) = titled(server.pid, "engine")
            os.kill(engine, signal.SIGKILL)
            killed_at = time.monotonic()
            load.wait_for(1, status=503, timeout=30)
            wait_until(lambda: [p for p in titled(server.pid, "engine") if p != engine], 60, "a new engine")
            back = wait_until(
                lambda: httpx.get(f"{server.url}/ready", timeout=30).status_code == 200, 300, "/ready"
            )
            load.wait_for(sum(1 for a in load.answers if a[0] == 200) + 8, timeout=120)
        in_flight = [a for a in load.answers if a[2] < killed_at < a[3]]
        refused = [a for a in load.answers if a[0] == 503]
    assert back
    assert all(a[1].endswith("[Retry-After]") for a in refused), refused[:3]
    # The requests the engine held when it died are answered at once, never left hanging.
    assert all(a[3] - killed_at < 3 for a in in_flight), [round(a[3] - killed_at, 2) for a in in_flight]
    assert {a[0] for a in load.answers} <= {200, 503}, {a[0] for a in load.answers}
    # It comes back with the model that was active, not the one the server started with.
    assert [a[1] for a in load.answers if a[0] == 200][-1] == "small-b"


def test_sigterm_drains_every_process(models: Path, tmp_path: Path) -> None:
    with fronted_server(weights_dir(models, tmp_path), tmp_path, request_timeout_s=10) as server:
        processes = [server.pid, *titled(server.pid, "")]
        assert list(Path("/dev/shm").glob(f"alexnet-serve-{server.pid}-*")), "no runtime folder in /dev/shm"
        assert len(titled(server.pid, "decode")) >= 2 and len(titled(server.pid, "engine")) == 1
        with Load(server.url, clients=6) as load:
            load.wait_for(5)
            server.proc.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            code = server.proc.wait(timeout=60)
            took = time.monotonic() - stopped_at
    assert code == 0 and took < 15 + 5, (code, took)
    assert not [pid for pid in processes if alive(pid)], "processes outlived the server"
    # Requests under way when SIGTERM came were answered; later ones found the port closed.
    assert all(a[0] in (0, 200) for a in load.answers), [a for a in load.answers if a[0] not in (0, 200)]
    assert any(a[0] == 200 and a[2] < stopped_at < a[3] for a in load.answers) or load.answers
    assert not list(Path("/dev/shm").glob(f"alexnet-serve-{server.pid}-*")), "the runtime folder was left"


def test_an_activation_answers_once_every_front_serves_it(models: Path, tmp_path: Path) -> None:
    with fronted_server(weights_dir(models, tmp_path), tmp_path) as server:
        with Load(server.url, clients=4, fresh_connections=True) as load:
            load.wait_for(8)
            answer = httpx.post(
                f"{server.url}/model/activate", json={"version": "small-b"}, headers=AUTH, timeout=60
            )
            answered_at = time.monotonic()
            load.wait_for(sum(1 for a in load.answers if a[0] == 200) + 30)
        assert answer.status_code == 200, answer.text
        later = [a for a in load.answers if a[2] > answered_at]
        assert later and all(a[0] == 200 and a[1] == "small-b" for a in later), later[:5]
        # One view of the model whichever front answers.
        for _ in range(6):
            assert httpx.get(f"{server.url}/model", timeout=30).json()["version"] == "small-b"


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """A front frozen: the kernel hands every new connection to the other one."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.long
def test_gallery_adds_through_both_fronts_all_survive_a_restart(models: Path, tmp_path: Path) -> None:
    weights = weights_dir(models, tmp_path)
    image = encode(photo().resize((160, 107)), "JPEG")
    statuses: list[int] = []

    def add(index: int) -> None:
        for _ in range(60):  # a client that honours 503 + Retry-After (the queue holds 64 images)
            with httpx.Client(timeout=120) as client:  # a connection each: spread over the fronts
                r = client.post(
                    f"{url}/gallery",
                    data={"id": f"item-{index}", "label": f"label {index}"},
                    files={"file": ("a.jpg", image, "image/jpeg")},
                    headers=AUTH,
                )
            if r.status_code != 503:
                break
            time.sleep(float(r.headers["retry-after"]))
        statuses.append(r.status_code)

    with fronted_server(weights, tmp_path) as server:
        url = server.url
        threads = [threading.Thread(target=add, args=(i,)) for i in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert statuses.count(201) == 100, sorted(set(statuses))
    with fronted_server(weights, tmp_path / "again") as server:
        listing = httpx.get(f"{server.url}/gallery", timeout=60).json()
        assert listing["count"] == 100
        assert {item["id"] for item in listing["items"]} == {f"item-{i}" for i in range(100)}
        thumb = httpx.get(f"{server.url}/gallery/item-7/thumbnail.png", timeout=60)
        assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")


@pytest.mark.long
def test_a_job_started_through_one_front_is_cancelled_through_the_other(models: Path, tmp_path: Path) -> None:
    from tests.digits import write_digits

    data_root = tmp_path / "data"
    write_digits(data_root / "digits", size=32)
    weights = weights_dir(models, tmp_path)
    job = {"dataset": "digits", "batch_size": 64, "input_size": 64, "resize_size": 73, "epochs": 50}
    with fronted_server(weights, tmp_path, data_root=data_root) as server:
        first, second = titled(server.pid, "front")
        with stopped(second):
            started = httpx.post(f"{server.url}/train", json=job, headers=AUTH, timeout=60)
        assert started.status_code == 202, started.text
        url = f"{server.url}/train/{started.json()['id']}"
        with stopped(first):
            wait_until(lambda: httpx.get(url, timeout=30).json()["state"] == "running", 300, "running")
            assert httpx.get(f"{server.url}/train", timeout=30).json()[0]["id"] == started.json()["id"]
            cancelled = httpx.delete(url, headers=AUTH, timeout=60)
        assert cancelled.status_code == 202, cancelled.text  # accepted: the trainer stops within a batch
        with stopped(second):
            final = wait_until(
                lambda: (j := httpx.get(url, timeout=30).json())["state"] not in ("queued", "running") and j,
                120,
                "the job to end",
            )
        assert final["state"] == "cancelled", final


def test_a_killed_supervisor_leaves_no_process_behind(models: Path, tmp_path: Path) -> None:
    with fronted_server(weights_dir(models, tmp_path), tmp_path) as server:
        below = titled(server.pid, "")
        assert len(below) >= 5  # two fronts, the engine, their decode workers
        server.proc.kill()
        server.proc.wait(timeout=30)
        wait_until(lambda: not [pid for pid in below if alive(pid)], 60, "the server's processes to end")
