"""The committed benchmark results as plots for the docs: ``docs/images/<name>.svg``.

    python -m benchmarks.plots [--results benchmarks/results] [--out docs/images] [--format svg png]

Every plot is drawn from the result JSONs alone (``benchmarks/plots_speed.py`` and
``plots_cost.py`` name the files each one reads); nothing is typed in by hand. The output is
byte-for-byte repeatable for one matplotlib version: the SVG ids come from a fixed salt, no date
is written, and text stays text (no glyph outlines, which depend on the font files found). The
SVG's ``Creator`` names the matplotlib that drew it: ``tests/test_plots.py`` reads it to know
whether a fresh render must equal the committed one.
"""

import argparse
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: no display on servers and in CI

from matplotlib.figure import Figure

from benchmarks import plots_cost, plots_speed
from benchmarks.plotting import FIGURES, Results, draw

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
OUT = REPO_ROOT / "docs" / "images"
FORMATS = ("svg", "png")
STYLE = {
    "svg.hashsalt": "alexnet-serve",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}
# Importing these modules is what registers their figures.
MODULES = (plots_speed, plots_cost)
# Keys of a format's metadata set to None are left out; the SVG keeps its Creator (the version).
METADATA = {"svg": {"Date": None}, "png": {"Software": None}}


@contextmanager
def style() -> Iterator[None]:
    with matplotlib.rc_context(STYLE):
        yield


def render(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, metadata=METADATA[fmt], dpi=110)
    return buffer.getvalue()


class PlotError(Exception):
    """A figure could not be drawn from the results given (a file missing, unreadable, or of
    another shape)."""


def render_all(results: Path, out: Path, formats: tuple[str, ...] = ("svg",)) -> list[Path]:
    """Draws every plot, then writes them all (none when one fails); files whose bytes are the
    same are left untouched."""
    data, rendered = Results(results), dict[Path, bytes]()
    with style():
        for name in FIGURES:
            try:
                figure = draw(name, data)
            except (OSError, KeyError, IndexError, TypeError, ValueError, StopIteration) as exc:
                raise PlotError(f"{name}: {type(exc).__name__}: {exc}") from exc
            rendered.update({out / f"{name}.{fmt}": render(figure, fmt) for fmt in formats})
    out.mkdir(parents=True, exist_ok=True)
    for path, content in rendered.items():
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)
    return list(rendered)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the result JSONs")
    p.add_argument("--out", type=Path, default=OUT, help="folder the plots go to")
    p.add_argument("--format", nargs="+", choices=FORMATS, default=["svg"], help="svg (the docs'), png")
    args = p.parse_args(argv)
    try:
        paths = render_all(args.results, args.out, tuple(args.format))
    except PlotError as exc:
        print(f"error: cannot draw the plots from {args.results}: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
