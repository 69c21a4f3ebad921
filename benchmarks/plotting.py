"""What the plots share: the result files, the registry of figures, axes helpers.

``FIGURES[name]`` is (the files it reads, the function drawing them); the function gets the files'
parsed JSON in that order and nothing else. ``benchmarks.plots_speed`` and ``benchmarks.plots_cost``
register the figures; the docs page (``docs/benchmarks.md``) embeds ``images/<name>.svg``.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, ScalarFormatter

Json = dict[str, Any]
Draw = Callable[..., Figure]

# One colour per kind of server process, the same in every plot.
KIND_COLOURS = {"front": "C0", "engine": "C1", "decode": "C2", "supervisor": "C4", "other": "C7"}
KIND_LABELS = {
    "front": "fronts (HTTP, multipart, JSON)",
    "engine": "engine process (free engine)",
    "decode": "decode workers",
    "supervisor": "supervisor",
    "other": "other (with ALEXNET_WORKERS=0: the one server process)",
}


class Results:
    """The result folder's JSON files, each parsed once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.parsed: dict[str, Json] = {}

    def __call__(self, name: str) -> Json:
        if name not in self.parsed:
            self.parsed[name] = json.loads((self.folder / name).read_text(encoding="utf-8"))
        return self.parsed[name]


FIGURES: dict[str, tuple[tuple[str, ...], Draw]] = {}


def figure(name: str, *sources: str) -> Callable[[Draw], Draw]:
    def register(draw: Draw) -> Draw:
        FIGURES[name] = (sources, draw)
        return draw

    return register


def draw(name: str, results: Results) -> Figure:
    sources, function = FIGURES[name]
    return function(*(results(s) for s in sources))


# --------------------------------------------------------------------------- helpers


def clients_axis(ax: Axes, clients: list[int]) -> None:
    """Clients on a log scale, ticked at the measured counts only."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("concurrent clients")


def plain_log_y(ax: Axes) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())


def image_label(run: Json, image: str) -> str:
    p = run["preprocess"][image]
    return f"{p['width']}x{p['height']} JPEG"


def points(run: Json, image: str, mode: str = "batching_on") -> list[Json]:
    rows = [p for p in run["e2e"][mode]["points"] if p["image"] == image]
    return sorted(rows, key=lambda p: p["concurrency"])


def server_model(run: Json) -> str:
    """How the benchmark's server ran, from the settings it recorded."""
    workers = run["e2e"]["batching_on"]["settings"].get("ALEXNET_WORKERS")
    if workers is None:
        return "default process model"
    return "one process" if workers == "0" else f"{workers} fronts + engine"


def engine_best(run: Json) -> float:
    """The engine alone measured right before the default server (10 crops per image)."""
    raw = run["raw_ort"]
    batches = next((c["batches"] for c in raw["rechecks"] if c["before"] == "batching_on"), raw["batches"])
    return max(b["images_per_s"] for b in batches)


def throughput_and_latency(fig: Figure, series: list[tuple[str, str, list[Json]]], tail: str) -> list[Axes]:
    """Images/s and p50 / ``tail`` latency against clients, one line per (label, colour, points)."""
    tput, lat = fig.subplots(1, 2)
    clients = sorted({p["concurrency"] for _, _, rows in series for p in rows})
    for label, colour, rows in series:
        c = [p["concurrency"] for p in rows]
        tput.plot(c, [p["images_per_s"] for p in rows], "o-", color=colour, label=label)
        lat.plot(c, [p["p50_ms"] for p in rows], "o-", color=colour, label=f"{label}, p50")
        lat.plot(c, [p[f"{tail}_ms"] for p in rows], "s--", color=colour, label=f"{label}, {tail}")
    for ax in (tput, lat):
        clients_axis(ax, clients)
    tput.set(ylabel="images/s (POST /predict)", title="throughput")
    lat.set(ylabel="latency (ms)", title=f"latency: p50 (solid), {tail} (dashed)")
    plain_log_y(lat)
    lat.legend()
    return [tput, lat]


def bar_labels(ax: Axes, bars: Any, fmt: str = "{:,.0f}") -> None:
    ax.bar_label(bars, labels=[fmt.format(b.get_height()) for b in bars], padding=2, fontsize=7)
