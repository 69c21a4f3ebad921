"""Figures of cost: where the CPU and a request's time go, one process against fronts, training."""

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from benchmarks.plotting import (
    KIND_COLOURS,
    KIND_LABELS,
    Json,
    clients_axis,
    figure,
    image_label,
    points,
    server_model,
)

# --------------------------------------------------------------------------- where the time goes


def throughput(rows: list[Json]) -> tuple[list[int], list[float]]:
    return [p["concurrency"] for p in rows], [p["images_per_s"] for p in rows]


def clients(count: int) -> str:
    return f"{count} client" if count == 1 else f"{count} clients"


def at(rows: list[Json], concurrency: int) -> Json:
    return next(p for p in rows if p["concurrency"] == concurrency)


def kind_bars(ax: Axes, x: float, kinds: dict[str, float], width: float, seen: set[str]) -> None:
    bottom = 0.0
    for kind, ms in kinds.items():
        label = KIND_LABELS.get(kind, kind) if kind not in seen else None
        ax.bar(x, ms, width, bottom=bottom, color=KIND_COLOURS.get(kind, "C9"), label=label)
        bottom += ms
        seen.add(kind)


@figure(
    "overhead",
    "overhead-cpu-2core-one-process.json",
    "overhead-cpu-2core-fronts.json",
    "overhead-h200-16core.json",
)
def overhead(one: Json, fronts: Json, h200: Json) -> Figure:
    """Server CPU per image with an engine that costs nothing, by kind of process, against the
    model's own preprocessing in one process (the floor)."""
    concurrency, runs = 16, (one, fronts, h200)
    fig = Figure(figsize=(9, 4), layout="constrained")
    seen: set[str] = set()
    for ax, image in zip(fig.subplots(1, 2), ("small", "large"), strict=True):
        names = []
        for x, run in enumerate(runs):
            result = run["images"][image]
            point = at(result["server"]["all"], concurrency)
            kinds = point.get("cpu_ms_per_image_by_kind") or {}
            if kinds:
                kind_bars(ax, x, kinds, 0.55, seen)
            else:
                label = "whole server (not split by process)" if "total" not in seen else None
                ax.bar(x, point["server_cpu_ms_per_image"], 0.55, color="C5", label=label)
                seen.add("total")
            floor = result["in_process"]["1"]["cpu_ms_per_image"]
            label = "model preprocessing alone, one process" if "floor" not in seen else None
            ax.hlines(floor, x - 0.35, x + 0.35, colors="k", linewidth=2, label=label)
            seen.add("floor")
            model = "fronts + engine" if "front" in kinds else "one process" if kinds else "not split"
            names.append(f"{run['meta']['machine'].split(', ')[1]},\n{model}")
        ax.set_xticks(range(len(runs)), names, fontsize=7)
        ax.set(
            ylabel="server CPU ms per image",
            title=f"{result['width']}x{result['height']} JPEG, {clients(concurrency)}",
        )
    fig.legend(loc="outside lower center", ncols=3)
    fig.suptitle("serving overhead: CPU per image with an engine that costs nothing (benchmarks.overhead)")
    return fig


@figure("latency-breakdown", "e2e-cpu-2core-workers2.json")
def latency_breakdown(run: Json) -> Figure:
    """The server's own account of a request (medians) against the client's p50."""
    stages = (
        ("server_decode_ms", "JPEG decode"),
        ("server_preprocess_ms", "resize and crops"),
        ("server_inference_ms", "the inference call it was part of"),
    )
    rows = [
        (f"{image_label(run, i)}, {clients(p['concurrency'])}", p)
        for i in ("small", "large")
        for p in points(run, i)
    ]
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    for n, (key, label) in enumerate(stages):
        left = [sum(p[k] for k, _ in stages[:n]) for _, p in rows]
        ax.barh(ys, [p[key] for _, p in rows], left=left, color=f"C{n + 2}", label=label)
    spent = [sum(p[k] for k, _ in stages) for _, p in rows]
    rest = [max(p["p50_ms"] - s, 0.0) for s, (_, p) in zip(spent, rows, strict=True)]
    ax.barh(ys, rest, left=spent, color="C7", label="the rest of p50: HTTP, upload, waiting for the engine")
    ax.set_yticks(ys, [r[0] for r in rows])
    ax.set(
        xlabel="ms (medians)",
        title=f"where a request's time goes ({run['meta']['machine']}, {server_model(run)})",
    )
    fig.legend(loc="outside lower center", ncols=2)
    return fig


# --------------------------------------------------------------------------- process model


@figure(
    "process-model",
    "overhead-cpu-2core-one-process.json",
    "overhead-cpu-2core-fronts.json",
    "e2e-cpu-2core-workers0.json",
    "e2e-cpu-2core-workers2.json",
)
def process_model(one: Json, fronts: Json, e2e_one: Json, e2e_fronts: Json) -> Figure:
    fig = Figure(figsize=(9, 4), layout="constrained")
    free, real = fig.subplots(1, 2)
    images = (("small", "o-"), ("large", "s--"))
    handles = []
    for colour, overhead_run, e2e_run in (("C1", one, e2e_one), ("C0", fronts, e2e_fronts)):
        model = server_model(e2e_run)
        kinds = overhead_run["images"]["small"]["server"]["all"][0].get("cpu_ms_per_image_by_kind", {})
        if ("front" in kinds) != (model != "one process"):
            raise ValueError(f"the free-engine and AlexNet runs paired as {model!r} ran different servers")
        handles.append(Line2D([], [], color=colour, label=model))
        for image, style in images:
            measured = overhead_run["images"][image]["server"]["all"]
            for ax, rows in ((free, measured), (real, points(e2e_run, image))):
                ax.plot(*throughput(rows), style, color=colour)
    clients_axis(free, [p["concurrency"] for p in fronts["images"]["small"]["server"]["all"]])
    clients_axis(real, [p["concurrency"] for p in points(e2e_fronts, "small")])
    for ax in (free, real):
        ax.set(ylabel="images/s", ylim=(0, None))
    small, large = (fronts["images"][i] for i in ("small", "large"))
    free.set_title(f"an engine that costs nothing ({small['width']}x{small['height']} JPEG)", fontsize=9)
    real.set_title(f"AlexNet on the CPU ({image_label(e2e_fronts, 'small')})", fontsize=9)
    large_label = f"the {large['width']}x{large['height']} JPEG"
    handles += [
        Line2D([], [], color="k", linestyle="-", marker="o", label="the small JPEG (in the titles)"),
        Line2D([], [], color="k", linestyle="--", marker="s", label=large_label),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    fig.suptitle(f"one process or fronts + engine: the same host ({fronts['meta']['machine']}), side by side")
    return fig


# --------------------------------------------------------------------------- training


@figure("training", "training-digits-cpu-2core.json")
def training(run: Json) -> Figure:
    steps = [e for e in run["events"] if e["event"] == "step"]
    epochs = [e for e in run["events"] if e["event"] == "epoch"]
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    loss, accuracy = fig.subplots(1, 2)
    loss.plot(
        [e["step"] for e in steps], [e["loss"] for e in steps], "-", color="C0", label="training (batch)"
    )
    loss.plot(
        [e["step"] for e in epochs], [e["val_loss"] for e in epochs], "o-", color="C1", label="validation"
    )
    loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    accuracy.plot([e["epoch"] for e in epochs], [e["val_top1"] for e in epochs], "o-", label="top-1")
    accuracy.plot([e["epoch"] for e in epochs], [e["val_top5"] for e in epochs], "s--", label="top-5")
    accuracy.set(xlabel="epoch", ylabel="validation accuracy (centre crop)", ylim=(0, 1.02), title="accuracy")
    accuracy.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss, accuracy):
        ax.legend()
    start = next(e for e in run["events"] if e["event"] == "start")
    fig.suptitle(
        f"training from scratch on digits ({start['train_images']} train / {start['val_images']} val "
        f"images, {start['device']}, {run['meta']['machine']})"
    )
    return fig
