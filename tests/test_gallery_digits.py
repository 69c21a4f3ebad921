"""The paper's Figure 4 claim on real data, over real HTTP: with a trained model, an image's nearest
gallery image (Euclidean distance of fc7 vectors) shares its class. Trains a small digits model
first, so it is slow-marked: ``pytest -m slow tests/test_gallery_digits.py``."""

from pathlib import Path

import httpx
import pytest

from model_export.export import export_onnx
from model_export.train import main as train
from model_export.weights import load_checkpoint
from tests.conftest import cpu_settings, serve
from tests.digits import write_digits

KEY = "digits-gallery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PER_CLASS = 60  # gallery images per digit, from the training split
QUERIES_PER_CLASS = 10  # query images per digit, from the validation split (never in the gallery)


def neighbour_shares(weights: Path, digits_root: Path) -> tuple[float, float]:
    """Fill the gallery over HTTP, query it with validation images: the share of queries whose
    nearest gallery image has their class, and the share of the 5 nearest that do."""
    nearest = hits = total = 0
    with serve(cpu_settings(weights, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=120) as c:
        for digit in range(10):
            for path in sorted((digits_root / "train" / str(digit)).glob("*.png"))[:PER_CLASS]:
                response = c.post(
                    "/gallery",
                    data={"id": f"{digit}-{path.stem}", "label": str(digit)},
                    files={"file": (path.name, path.read_bytes(), "image/png")},
                    headers=AUTH,
                )
                assert response.status_code == 201, response.text
        assert c.get("/gallery").json()["count"] == 10 * PER_CLASS
        for digit in range(10):
            for path in sorted((digits_root / "val" / str(digit)).glob("*.png"))[:QUERIES_PER_CLASS]:
                response = c.post("/similar", params={"k": 5}, files={"file": (path.name, path.read_bytes())})
                assert response.status_code == 200, response.text
                labels = [n["label"] for n in response.json()["neighbours"]]
                nearest += labels[0] == str(digit)
                hits += labels.count(str(digit))
                total += len(labels)
    return nearest / (10 * QUERIES_PER_CLASS), hits / total


@pytest.mark.slow
def test_nearest_neighbours_share_the_class(tmp_path: Path) -> None:
    digits = write_digits(tmp_path / "digits", size=32)
    run, weights = tmp_path / "run", tmp_path / "weights"
    # The recipe tests/test_training.py measures: 64 px crops, stops at 90 % validation top-1.
    code = train([
        str(digits.root), "--out", str(run), "--no-export", "--input-size", "64", "--resize-size", "73",
        "--batch-size", "64", "--no-progress", "--no-flip", "--epochs", "12", "--stop-at-top1", "0.9",
        "--seed", "0",
    ])  # fmt: skip
    assert code == 0
    checkpoint = load_checkpoint(run / "checkpoint.pt")
    export_onnx(checkpoint, weights / "digits.onnx", input_size=64, resize_size=73, features=True)
    nearest, of_five = neighbour_shares(weights, digits.root)
    print(
        f"\ndigits: nearest gallery image of the query's class {nearest:.3f}, of the 5 nearest {of_five:.3f}"
    )
    assert nearest >= 0.9
