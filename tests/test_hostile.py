"""benchmarks/hostile.py: its costly-but-valid images are what they claim to be, and the attack
program runs end to end (a short run, slow)."""

import io
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.hostile import lying_webp, png_16bit, progressive_jpeg
from tests.processes import run_report


def test_costly_images_are_small_files_at_the_pixel_limit() -> None:
    png = png_16bit()
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode.startswith("I;16") and image.size == (7999, 7999)
    assert 50_000 < len(png) < 200_000  # 128 MB of samples in about 120 KB
    jpeg = progressive_jpeg()
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.info.get("progressive") and image.size == (7999, 7999)
    webp = lying_webp()
    assert len(webp) == 34 and webp[:4] == b"RIFF" and webp[8:16] == b"WEBPVP8X"
    assert int.from_bytes(webp[24:27], "little") + 1 == 7999  # the canvas it claims


@pytest.mark.slow
def test_short_attack_reports_every_figure(imagenet_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "--minutes", "0.2", "--concurrency", "6",
        "--stalled", "2", "--idle", "10", "--json-mb", "2",
        "--model", str(imagenet_model_dir / "alexnet-random.onnx"),
    ]  # fmt: skip
    _, report = run_report("benchmarks.hostile", args, tmp_path, timeout=900, codes=(0, 1))
    assert report["errors_5xx_except_503"] == 0 and report["server_alive"], report
    assert report["requests"] > 0 and report["valid_small"]["requests"] > 0
    assert report["rss_peak_mb"] > 0 and report["stalled_uploads"]["count"] >= 2
    assert report["next_request"]["status"] == 200
