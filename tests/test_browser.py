"""The interactive docs in a real browser: headless Chromium opens /docs of a real server, uploads a
photo through Swagger UI's "Try it out" form and gets predictions back, while every request the
page makes is checked (and anything not for 127.0.0.1 blocked) through the DevTools protocol.

Driven over the Chrome DevTools Protocol with the `websockets` client (already a dependency of
uvicorn[standard]) rather than Playwright or Selenium: no driver binaries, no node_modules, and
the one browser is the distribution's Chromium (apt-get install chromium).
"""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image
from sklearn.datasets import load_sample_image
from websockets.sync.client import ClientConnection, connect

from benchmarks.server import stop_process
from tests.conftest import cpu_settings, serve

STEP_TIMEOUT_S = 20.0
# Schemes that never leave the browser process.
LOCAL_SCHEMES = {"data", "blob", "about"}


def find_chromium() -> str | None:
    if path := os.environ.get("CHROMIUM"):
        return path
    return next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None
    )


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")


class DevTools:
    """A minimal CDP client for one page target: commands wait for their own reply while events
    that arrive in between go to the handlers (which may send commands without waiting)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._next_id = 0

    def post(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        return self._next_id

    def _dispatch(self, message: dict[str, Any]) -> None:
        if (handler := self.handlers.get(message.get("method", ""))) is not None:
            handler(message.get("params", {}))

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        wanted = self.post(method, params)
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._dispatch(message)  # an event, or the reply to a command nobody waits for

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            if value := self.evaluate(expression):
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what} ({expression})")

    def click(self, selector: str) -> None:
        """A real mouse click at the element's centre, as a user would make it."""
        point = self.wait_for(
            f"""(() => {{
                const el = document.querySelector({json.dumps(selector)});
                if (!el || el.disabled) return null;
                el.scrollIntoView({{block: "center"}});
                const r = el.getBoundingClientRect();
                return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null;
            }})()""",
            f"a clickable {selector}",
        )
        x, y = point
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )


@contextmanager
def chromium(profile: Path) -> Iterator[DevTools]:
    assert CHROMIUM is not None
    args = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests run as root in CI containers, where the sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-dev-shm-usage",
        # Belt and braces: no name resolves but the loopback address, whatever a component tries.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",  # Chromium picks a free port and writes it to the profile
        "--window-size=1280,1600",
        "about:blank",
    ]
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if process.poll() is not None:
                raise RuntimeError(f"Chromium exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().splitlines()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield DevTools(ws)
    finally:
        stop_process(process, timeout_s=10)
        # Helpers of the browser this test started (its own process group) can outlive it and
        # keep writing into the profile: end them too.
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def is_loopback(url: str, port: int) -> bool:
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    return parts.scheme in ("http", "https", "ws", "wss") and (parts.hostname, parts.port) == (
        "127.0.0.1",
        port,
    )


class RequestGuard:
    """Every request the page makes pauses here (Fetch domain) and is recorded; those for the
    server under test go on, anything else is failed before it leaves the browser."""

    def __init__(self, page: DevTools, port: int) -> None:
        self.page, self.port = page, port
        self.requests: list[tuple[str, str]] = []
        self.blocked: list[str] = []
        page.handlers["Fetch.requestPaused"] = self._paused
        page.handlers["Network.requestWillBeSent"] = self._sent
        page.handlers["Network.webSocketCreated"] = lambda p: self.requests.append(("WS", p["url"]))
        page.send("Network.enable")
        page.send("Fetch.enable", {"patterns": [{"urlPattern": "*"}]})
        page.send("Page.enable")
        page.send("Runtime.enable")

    def _paused(self, params: dict[str, Any]) -> None:
        request = params["request"]
        self.requests.append((request["method"], request["url"]))
        if is_loopback(request["url"], self.port):
            self.page.post("Fetch.continueRequest", {"requestId": params["requestId"]})
        else:
            self.blocked.append(request["url"])
            self.page.post(
                "Fetch.failRequest", {"requestId": params["requestId"], "errorReason": "BlockedByClient"}
            )

    def _sent(self, params: dict[str, Any]) -> None:
        self.requests.append((params["request"]["method"], params["request"]["url"]))

    def outside(self) -> list[str]:
        return sorted({url for _, url in self.requests if not is_loopback(url, self.port)})


@contextmanager
def browse(weights_dir: Path, tmp_path: Path, path: str) -> Iterator[tuple[str, DevTools, RequestGuard]]:
    """A real server on ``weights_dir`` and Chromium navigating to its ``path``, every request the
    page makes guarded: (the server's URL, the page, the guard)."""
    with serve(cpu_settings(weights_dir)) as base_url, chromium(tmp_path / "chromium-profile") as page:
        guard = RequestGuard(page, int(urlsplit(base_url).port or 0))
        page.send("Page.navigate", {"url": f"{base_url}{path}"})
        yield base_url, page, guard


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A real photograph (scikit-learn ships it: no download) as a JPEG file."""
    path = tmp_path / "china.jpg"
    Image.fromarray(load_sample_image("china.jpg")).save(path, "JPEG", quality=90)
    return path


def test_request_guard_catches_outside_requests(tmp_path: Path) -> None:
    """The guard below is not vacuous: a page that reaches for another host is seen and stopped."""
    with browse(tmp_path, tmp_path, "/health") as (base_url, page, guard):
        page.wait_for("document.readyState === 'complete' && document.body.innerText.length > 0", "/health")
        outcome = page.send(
            "Runtime.evaluate",
            {
                "expression": "fetch('http://192.0.2.1/probe').then(() => 'fetched', e => 'failed: ' + e)",
                "awaitPromise": True,
                "returnByValue": True,
            },
        )["result"]["value"]
    assert outcome.startswith("failed")
    assert guard.blocked == ["http://192.0.2.1/probe"]
    assert guard.outside() == ["http://192.0.2.1/probe"]
    assert ("GET", f"{base_url}/health") in guard.requests


def test_swagger_ui_predict(imagenet_model_dir: Path, photo: Path, tmp_path: Path) -> None:
    operation = "#operations-predict-predict_predict_post"
    with browse(imagenet_model_dir, tmp_path, "/docs") as (base_url, page, guard):
        page.wait_for(f"!!document.querySelector('{operation}')", "Swagger UI to render POST /predict")
        page.click(f"{operation} .opblock-summary-control")
        page.click(f"{operation} .try-out__btn")

        # The `file` field of the multipart form (not `files`), found by its row in the form.
        file_input = page.send(
            "Runtime.evaluate",
            {
                "expression": f"""document.querySelector(
                    '{operation} tr[data-property-name="file"] input[type="file"]')"""
            },
        )["result"]
        assert file_input.get("subtype") != "null", "no file input for `file` in the Try-it-out form"
        page.send("DOM.setFileInputFiles", {"files": [str(photo)], "objectId": file_input["objectId"]})

        page.click(f"{operation} .execute")
        status = page.wait_for(
            f"""document.querySelector(
                '{operation} .live-responses-table tbody .response-col_status')?.innerText""",
            "the response to appear",
        )
        body_text = page.wait_for(
            f"""document.querySelector(
                '{operation} .live-responses-table tbody .response-col_description .highlight-code pre')
                ?.innerText""",
            "the response body",
        )

    assert status.strip() == "200", f"status {status!r}: {body_text}"
    body = json.loads(body_text)
    (result,) = body["results"]
    assert result["filename"] == "china.jpg"
    predictions = result["predictions"]
    assert len(predictions) == 5  # the top_k default
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert all(p["label"] for p in predictions)

    # The page talked to the server under test and nothing else.
    assert ("POST", f"{base_url}/predict?top_k=5") in guard.requests, guard.requests
    assert ("GET", f"{base_url}/openapi.json") in guard.requests
    assert guard.blocked == [], f"requests that would have left the machine: {guard.blocked}"
    assert guard.outside() == [], f"requests not to the server under test: {guard.outside()}"
