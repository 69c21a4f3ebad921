"""GET /model/kernels.png over real HTTP: the first layer's kernels of the model in service, drawn
from the ONNX file and checked tile by tile against the torch weights it was exported from."""

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service import kernels
from service.kernels import BORDER, GROUP_GAP, scaled
from tests.conftest import cpu_settings, serve


@pytest.fixture(scope="module")
def paper_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model_export.export import export_onnx
    from model_export.weights import random_weights

    weights_dir = tmp_path_factory.mktemp("paper-weights")
    export_onnx(random_weights("paper", seed=3, num_classes=10), weights_dir / "paper-random.onnx")
    return weights_dir


def conv1(layout: str, seed: int, num_classes: int) -> np.ndarray:
    from model_export.weights import random_weights

    model = random_weights(layout, seed=seed, num_classes=num_classes).model
    return model.features[0].weight.detach().numpy()


def tile(picture: np.ndarray, top: int, left: int, size: int, scale: int) -> np.ndarray:
    return picture[top : top + size * scale : scale, left : left + size * scale : scale]


def test_torchvision_grid_matches_the_exported_weights(client: httpx.Client) -> None:
    response = client.get("/model/kernels.png", params={"scale": 2})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    weights = conv1("torchvision", seed=0, num_classes=1000)  # the conftest model's weights
    assert weights.shape == (64, 3, 11, 11)
    step = 11 * 2 + BORDER
    assert picture.shape == (8 * step + BORDER, 8 * step + BORDER, 3)  # 64 kernels: 8 x 8
    for i in (0, 9, 63):
        row, col = divmod(i, 8)
        got = tile(picture, BORDER + row * step, BORDER + col * step, 11, 2)
        assert np.abs(got.astype(int) - scaled(weights[i]).astype(int)).max() <= 1, f"kernel {i}"
    # Each kernel is min-max scaled on its own: every tile reaches both ends of the range.
    assert got.min() == 0 and got.max() == 255


def test_paper_layout_shows_the_two_groups_apart(paper_model_dir: Path) -> None:
    weights = conv1("paper", seed=3, num_classes=10)
    assert weights.shape == (96, 3, 11, 11)
    scale = 3
    step = 11 * scale + BORDER
    group_h = 3 * step + BORDER  # 48 kernels: three rows of 16
    with serve(cpu_settings(paper_model_dir)) as url, httpx.Client(base_url=url, timeout=60) as c:
        first = c.get("/model/kernels.png", params={"scale": scale})
        again = c.get("/model/kernels.png", params={"scale": scale})
    assert first.status_code == 200, first.text
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    picture = np.asarray(Image.open(io.BytesIO(first.content)).convert("RGB"))
    assert picture.shape == (2 * group_h + GROUP_GAP, 16 * step + BORDER, 3)
    # The gap between the groups is blank, and kernel 48 (the second GPU's first) starts below it.
    assert (picture[group_h : group_h + GROUP_GAP] == 255).all()
    got = tile(picture, group_h + GROUP_GAP + BORDER, BORDER, 11, scale)
    assert np.abs(got.astype(int) - scaled(weights[48]).astype(int)).max() <= 1
    got = tile(picture, BORDER + 2 * step, BORDER + 15 * step, 11, scale)  # kernel 47, end of group 1
    assert np.abs(got.astype(int) - scaled(weights[47]).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "params", [{"scale": 0}, {"scale": 17}, {"scale": "abc"}, {"scale": "1e9"}, {"scale": "-1"}]
)
def test_bad_scale_is_a_422(client: httpx.Client, params: dict[str, object]) -> None:
    response = client.get("/model/kernels.png", params=params)
    assert response.status_code == 422
    assert "scale" in response.json()["detail"]


def test_no_model_is_a_503_and_wrong_method_a_405(tmp_path: Path) -> None:
    with serve(cpu_settings(tmp_path)) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/model/kernels.png").status_code == 503
        assert "no model loaded" in c.get("/model/kernels.png").json()["detail"]
        assert c.post("/model/kernels.png").status_code == 405
        assert "/model/kernels.png" in c.get("/openapi.json").json()["paths"]


def test_concurrent_first_requests_read_the_model_once(server: str) -> None:
    """Each read parses the whole model file (hundreds of MB held while it runs): the first
    requests after a start or an activation share one. The server runs in this process, so the
    cache's own count says how many reads there were."""
    kernels.kernels_png.cache_clear()
    kernels.cached_weights.cache_clear()
    scales = [4, 4, 4, 1, 2, 3]

    def get(scale: int) -> httpx.Response:
        return httpx.get(f"{server}/model/kernels.png", params={"scale": scale}, timeout=120)

    with ThreadPoolExecutor(len(scales)) as pool:
        answers = list(pool.map(get, scales))
    assert [a.status_code for a in answers] == [200] * len(scales)
    assert answers[0].content == answers[1].content == answers[2].content
    info = kernels.cached_weights.cache_info()
    assert (info.misses, info.currsize) == (1, 1), info
