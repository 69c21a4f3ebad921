"""The page at GET / in headless Chromium (the DevTools client of tests/test_browser.py): a real
upload through its file input shows the top-5 as bars and the nearest gallery images, the model
in service is named, a bad file shows the API's own error text, a screenshot shows the bars, and
the page makes no request but to the server under test (no CDN: it works offline)."""

import base64
import io
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import cpu_settings, serve
from tests.test_browser import CHROMIUM, DevTools, RequestGuard, chromium
from tests.test_gallery import KEY, add, export, image

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")
BAR_RGB = (0x2B, 0x6C, 0xB0)  # --bar in page.css


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("page-weights")
    export(directory / "feat.onnx", seed=1)
    return directory


def choose_file(page: DevTools, path: Path) -> None:
    """What a user's "choose" does: the file goes into the page's <input type=file> (which fires change)."""
    node = page.send("Runtime.evaluate", {"expression": "document.getElementById('file')"})["result"]
    page.send("DOM.setFileInputFiles", {"files": [str(path)], "objectId": node["objectId"]})


def test_page_upload_bars_neighbours_and_errors(weights: Path, tmp_path: Path) -> None:
    query = tmp_path / "query.png"
    query.write_bytes(image(2))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with serve(cpu_settings(weights, api_key=KEY)) as base_url, chromium(tmp_path / "profile") as page:
        with httpx.Client(base_url=base_url, timeout=60) as c:
            for i in (1, 2, 3):
                assert add(c, f"item-{i}", image(i), label=f"picture {i}").status_code == 201
            version = c.get("/model").json()["version"]
        guard = RequestGuard(page, int(urlsplit(base_url).port or 0))
        page.send("Page.navigate", {"url": f"{base_url}/"})
        model_line = page.wait_for(
            "document.getElementById('model')?.innerText.includes('Model in service') && "
            "document.getElementById('model').innerText",
            "the model in service",
        )
        assert version in model_line and "untrained" in model_line

        choose_file(page, query)
        page.wait_for("document.querySelectorAll('#bars li').length === 5", "five bars")
        page.wait_for(
            "document.querySelectorAll('#neighbours img').length === 3 && "
            "[...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth > 0)",
            "the nearest gallery images, loaded",
        )
        rows = page.evaluate(
            """[...document.querySelectorAll('#bars li')].map(li => ({
                label: li.querySelector('.label').innerText,
                text: li.querySelector('.probability').innerText,
                width: li.querySelector('.bar').getBoundingClientRect().width,
                track: li.querySelector('.track').getBoundingClientRect().width}))"""
        )
        neighbours = page.evaluate("[...document.querySelectorAll('#neighbours li')].map(li => li.innerText)")
        first_bar = page.evaluate(
            """(() => { const r = document.querySelector('#bars li .bar').getBoundingClientRect();
                return [r.x, r.y, r.width, r.height]; })()"""
        )
        shot = page.send("Page.captureScreenshot", {"format": "png"})["data"]

        choose_file(page, bad)
        error = page.wait_for(
            "!document.getElementById('error').hidden && document.getElementById('error').innerText",
            "the API's error text",
        )

    # The bars: labels of the model's classes, widths in proportion to the probabilities shown.
    assert all(r["label"].startswith("class_") or r["label"] for r in rows)
    shown = [float(r["text"].rstrip(" %")) / 100 for r in rows]
    assert shown == sorted(shown, reverse=True) and 0 < sum(shown) <= 1.001
    for r, p in zip(rows, shown, strict=True):
        assert r["width"] == pytest.approx(max(2.0, p * r["track"]), abs=1.5)
    # The query is gallery item 2 itself: nearest, at distance 0.
    assert neighbours[0].startswith("item-2 · picture 2") and "distance 0.00" in neighbours[0]
    # The screenshot shows the first bar where the DOM says it is, in the bar colour.
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB"))
    x, y, w, h = (round(v) for v in first_bar)
    inside = picture[y + 2 : y + h - 2, x + 1 : x + max(2, w) - 1].reshape(-1, 3)
    assert len(inside) and (np.abs(inside.astype(int) - BAR_RGB).max(axis=1) <= 8).mean() > 0.9
    Image.fromarray(picture).save(tmp_path / "page.png")  # pytest keeps it, to look at
    # A bad file: the API's own detail, word for word.
    assert "not a supported image" in error
    # Nothing but the server under test was asked for anything.
    assert guard.blocked == [] and guard.outside() == []
    paths = {urlsplit(url).path for _, url in guard.requests}
    assert {"/", "/static/page/page.js", "/static/page/page.css", "/model", "/predict", "/similar"} <= paths


def test_page_does_not_hide_the_api(weights: Path) -> None:
    """GET / is the page; /docs, /health and the OpenAPI document are as before, and / is not in it."""
    with serve(cpu_settings(weights)) as base_url, httpx.Client(base_url=base_url, timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert (
            '<script src="/static/page/page.js"' in page.text and "http" not in page.text.split("<body>")[0]
        )
        assert c.get("/static/page/page.js").status_code == 200
        assert c.get("/static/page/missing.js").status_code == 404
        assert c.get("/static/page/../routers/page.py").status_code == 404
        assert c.post("/").status_code == 405
        assert c.get("/docs").status_code == 200 and c.get("/health").json() == {"status": "ok"}
        assert "/" not in c.get("/openapi.json").json()["paths"]
