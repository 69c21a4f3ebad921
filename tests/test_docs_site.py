"""The docs site: built with ``mkdocs build --strict`` (a broken link fails), served over HTTP and
looked at in headless Chromium (three pages rendered with their title and navigation, no 404,
nothing fetched from elsewhere); the configuration tables generated from the settings models list
every setting and every training parameter under the options the real command lines accept.

``ALEXNET_DOCS_SCREENSHOTS=docs/images/screenshots pytest -n 0 tests/test_docs_site.py`` also
writes the three screenshots into that folder (the committed ones are made so)."""

import base64
import contextlib
import functools
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from alexnet_core.training import TrainRun
from model_export.options import parser as train_parser
from service.core.config import Settings, from_command_line
from service.schemas import TrainRequest
from tests.test_browser import CHROMIUM, DevTools, RequestGuard, chromium

ROOT = Path(__file__).resolve().parent.parent
# (path under the site, the page's heading, a text the page must show)
PAGES = [
    ("", "alexnet-serve", "Where to read"),
    ("configuration/", "Configuration", "ALEXNET_MAX_QUEUE_IMAGES"),
    ("operations/", "Operations", "What each status code means"),
]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")


def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("settings_tables", ROOT / "docs/hooks/settings_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stderr[-4000:]
    return out


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # a line per request is noise here
        pass


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[int]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    for page in ("index", "install/index", "configuration/index", "api/v2/index", "security/index"):
        assert (site / f"{page}.html").is_file(), page
    # Hooks are code, not pages.
    assert not (site / "hooks").exists()


def test_configuration_page_lists_every_setting_and_parameter(site: Path) -> None:
    page = (site / "configuration" / "index.html").read_text()
    assert "<!-- settings:" not in page
    for name in Settings.model_fields:
        assert f"ALEXNET_{name.upper()}" in page, name
    for name in {*TrainRun.model_fields, *TrainRequest.model_fields} - {"data"}:
        assert f"<code>{name}</code>" in page or f"--{name.replace('_', '-')}" in page, name


def test_documented_options_are_the_real_command_lines(capsys: pytest.CaptureFixture[str]) -> None:
    tables = hook()
    with pytest.raises(SystemExit):
        from_command_line(["--help"])
    serve_help = capsys.readouterr().out
    for option in re.findall(r"`(--[a-z0-9-]+)`", tables.settings_table()):
        assert re.search(rf"{option}\b", serve_help), option
    train_help = train_parser().format_help()
    for option in re.findall(r"`(--[a-z0-9-]+)`", tables.training_table()):
        assert re.search(rf"{option}\b", train_help), option


def _settle(page: DevTools, expected_title: str, text: str) -> dict[str, object]:
    page.wait_for("document.readyState === 'complete'", "the page loaded")
    return page.evaluate(
        f"""(() => ({{
            status: performance.getEntriesByType('navigation')[0].responseStatus,
            title: document.title,
            heading: (document.querySelector('article h1')?.innerText ?? '').replace('¶', '').trim(),
            navLinks: document.querySelectorAll('nav.md-nav--primary a.md-nav__link').length,
            shows: document.body.innerText.includes({text!r}),
            expected: document.title.includes({expected_title!r}),
        }}))()"""
    )


@needs_chromium
def test_three_pages_in_headless_chromium(site: Path, tmp_path: Path) -> None:
    keep = os.environ.get("ALEXNET_DOCS_SCREENSHOTS")
    with http_server(site) as port, chromium(tmp_path / "profile") as page:
        guard = RequestGuard(page, port)
        page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        for path, heading, text in PAGES:
            page.send("Page.navigate", {"url": f"http://127.0.0.1:{port}/{path}"})
            seen = _settle(page, heading, text)
            assert seen["status"] == 200, (path, seen)
            assert seen["expected"] and "404" not in str(seen["title"]), (path, seen)
            assert seen["heading"] == heading or path == "", (path, seen)
            assert seen["shows"], (path, text)
            assert int(str(seen["navLinks"])) >= 10, (path, seen)  # the site's navigation rendered
            png = page.send("Page.captureScreenshot", {"format": "png"})["data"]
            name = (path.strip("/") or "home") + ".png"
            shot = tmp_path / name
            shot.write_bytes(base64.b64decode(png))
            image = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
            assert image.size == (1280, 900)
            low, high = image.getextrema()
            assert high - low > 100, f"{name} is blank"  # text on a background, not an empty page
            if keep:
                Path(keep).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, Path(keep) / name)
        # The site works offline: no fonts or scripts from elsewhere.
        assert guard.outside() == [], guard.outside()
    # A path that does not exist is a 404 from the server, so the check above can fail.
    with http_server(site) as port, chromium(tmp_path / "profile-404") as page:
        page.send("Page.navigate", {"url": f"http://127.0.0.1:{port}/no-such-page/"})
        assert _settle(page, "alexnet-serve", "")["status"] == 404
