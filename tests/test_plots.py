"""``python -m benchmarks.plots``: every plot the benchmarks page embeds is drawn from the committed
result JSONs, holds data, and equals the committed image (so the docs cannot drift from the data)."""

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import pytest
from PIL import Image

from benchmarks.plots import MODULES, render, style
from benchmarks.plotting import FIGURES, Results, draw
from tests.processes import REPO_ROOT

PAGE = REPO_ROOT / "docs" / "benchmarks.md"
IMAGES = REPO_ROOT / "docs" / "images"
RESULTS = REPO_ROOT / "benchmarks" / "results"
SVG = "{http://www.w3.org/2000/svg}"


def plots(*args: str) -> "subprocess.CompletedProcess[str]":
    command = [sys.executable, "-m", "benchmarks.plots", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    done = plots("--out", str(out), "--format", "svg", "png")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def embedded() -> list[str]:
    """The plot names the page shows, in its order."""
    return re.findall(r"!\[[^\]]+\]\(images/([\w-]+)\.svg\)", PAGE.read_text(encoding="utf-8"))


def drawn_paths(svg: Path) -> list[str]:
    """The ``d`` of every path in the figure with at least two vertices (lines, bars, markers)."""
    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"
    return [d for p in root.iter(f"{SVG}path") if len(re.findall(r"[ML]", d := p.get("d", ""))) >= 2]


def test_the_page_embeds_every_plot_and_each_is_drawn_with_data(rendered: Path) -> None:
    assert MODULES  # the figure modules are loaded, so FIGURES is complete
    names = embedded()
    assert sorted(names) == sorted(FIGURES), "the page and benchmarks.plots disagree on the plots"
    for name in names:
        svg = rendered / f"{name}.svg"
        assert svg.is_file(), f"{name}.svg was not drawn"
        # Axes, ticks and legend alone make a dozen paths; data adds lines, markers and bars.
        assert len(drawn_paths(svg)) >= 20, f"{name}.svg holds too little to be a plot of data"
        with Image.open(rendered / f"{name}.png") as png:
            assert png.format == "PNG" and png.width >= 800 and len(png.getcolors(1 << 24) or ()) > 16


def test_the_page_names_the_results_each_plot_reads() -> None:
    page = PAGE.read_text(encoding="utf-8")
    for name, (sources, _) in FIGURES.items():
        for source in sources:
            assert (RESULTS / source).is_file(), f"{name} reads {source}, which is not committed"
            assert source in page, f"docs/benchmarks.md does not say that {name} comes from {source}"


def committed_version(svg: Path) -> str:
    found = re.search(r"Matplotlib v([\w.+-]+),", svg.read_text(encoding="utf-8"))
    assert found, f"{svg} does not say which matplotlib drew it"
    return found.group(1)


def test_the_committed_plots_equal_a_fresh_render(rendered: Path) -> None:
    committed = sorted(f"{name}.svg" for name in FIGURES)
    missing = [name for name in committed if not (IMAGES / name).is_file()]
    assert not missing, f"not committed under docs/images: {missing}"
    versions = {committed_version(IMAGES / name) for name in committed}
    if versions != {matplotlib.__version__}:
        # Another matplotlib lays out and writes SVG differently; constraints.txt pins the one CI uses.
        pytest.skip(f"committed plots drawn by matplotlib {versions}, this is {matplotlib.__version__}")
    for name in committed:
        assert (rendered / name).read_bytes() == (IMAGES / name).read_bytes(), (
            f"docs/images/{name} differs from a fresh render: run python -m benchmarks.plots and commit"
        )


def test_a_missing_result_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for path in RESULTS.glob("*.json"):
        if path.name != "gpu-h200.json":
            (results / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    done = plots("--results", str(results), "--out", str(out))
    assert done.returncode == 1
    assert "gpu-h200.json" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists(), "a partial set of plots was written"


@pytest.mark.slow
def test_a_short_training_run_becomes_a_curve_the_plots_draw(tmp_path: Path) -> None:
    out = tmp_path / "training-digits-cpu-2core.json"
    args = ["--epochs", "1", "--out", str(out)]
    command = [sys.executable, "-m", "benchmarks.training_curve", *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(out.read_text())
    kinds = [e["event"] for e in run["events"]]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("epoch") == 1 and "step" in kinds
    assert run["meta"]["command"] == "python -m benchmarks.training_curve " + " ".join(args)
    svg = tmp_path / "training.svg"
    with style():
        svg.write_bytes(render(draw("training", Results(tmp_path)), "svg"))
    assert len(drawn_paths(svg)) >= 20
