"""Figures of speed: throughput and latency against clients, the service against the engine and
against other systems' published figures."""

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import ScalarFormatter

from benchmarks.plotting import (
    Json,
    bar_labels,
    engine_best,
    figure,
    image_label,
    plain_log_y,
    points,
    throughput_and_latency,
)

# --------------------------------------------------------------------------- clients


@figure("clients-cpu", "e2e-cpu-2core-workers2.json")
def clients_cpu(run: Json) -> Figure:
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    series = [(image_label(run, i), f"C{n}", points(run, i)) for n, i in enumerate(("small", "large"))]
    tput, _ = throughput_and_latency(fig, series, "p99")
    engine = engine_best(run)
    tput.axhline(engine, color="k", linestyle=":", linewidth=1)
    tput.annotate(
        f"engine alone: {engine:.1f} images/s",
        (1, engine),
        textcoords="offset points",
        xytext=(2, -10),
        fontsize=7,
    )
    tput.set_ylim(0, engine * 1.15)
    tput.legend(loc="lower right")
    meta, settings = run["meta"], run["e2e"]["batching_on"]["settings"]
    chosen = ", ".join(f"{k}={v}" for k, v in settings.items()) or "default settings"
    fig.suptitle(f"CPU host ({meta['machine']}, {meta['cpu_model']}): server with {chosen}, batching on")
    return fig


@figure("clients-gpu", "gpu-h200.json")
def clients_gpu(gpu: Json) -> Figure:
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    kinds = [
        (f"{kind} kind", f"C{n}", gpu["http"][kind]["points"]) for n, kind in enumerate(("square", "crops"))
    ]
    tput, _ = throughput_and_latency(fig, kinds, "p95")
    for n, kind in enumerate(("square", "crops")):
        best = max(b["images_per_s"] for b in gpu["engine"][kind]["batches"])
        tput.axhline(best, color=f"C{n}", linestyle=":", linewidth=1)
        tput.annotate(
            f"{kind} engine alone: {best:,.0f}/s",
            (1, best),
            textcoords="offset points",
            xytext=(2, 3),
            fontsize=7,
        )
    plain_log_y(tput)
    tput.legend(loc="center right")
    device = gpu["device"]
    fig.suptitle(
        f"GPU host ({device['gpus'][0].split(',')[0]}, {device['cpus']} cores): server on ONNX Runtime "
        f"{gpu['onnxruntime']}, {gpu['http']['square']['server_providers'][0]}"
    )
    return fig


# --------------------------------------------------------------------------- ceilings


@figure(
    "service-vs-engine",
    "e2e-cpu-2core-workers2.json",
    "overhead-cpu-2core-fronts.json",
    "gpu-h200.json",
    "overhead-h200-16core.json",
)
def service_vs_engine(cpu: Json, cpu_host: Json, gpu: Json, gpu_host: Json) -> Figure:
    gpu_name = gpu["device"]["gpus"][0].split(",")[0].removeprefix("NVIDIA ")
    groups = {
        f"{len(cpu_host['meta']['cores_available'])}-core CPU host": (
            engine_best(cpu),
            max(p["images_per_s"] for p in points(cpu, "small")),
            cpu_host["images"]["small"]["in_process"]["all"]["images_per_s"],
        ),
        f"{gpu_name} host, square kind": (
            max(b["images_per_s"] for b in gpu["engine"]["square"]["batches"]),
            max(p["images_per_s"] for p in gpu["http"]["square"]["points"]),
            gpu_host["images"]["small"]["in_process"]["all"]["images_per_s"],
        ),
        f"{gpu_name} host, crops kind": (
            max(b["images_per_s"] for b in gpu["engine"]["crops"]["batches"]),
            max(p["images_per_s"] for p in gpu["http"]["crops"]["points"]),
            None,
        ),
    }
    small = gpu_host["images"]["small"]
    names = (
        "engine alone (best batch)",
        "POST /predict (best client count)",
        f"model preprocessing alone, one process per core ({small['width']}x{small['height']} JPEG)",
    )
    fig = Figure(figsize=(9, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.27
    for n, name in enumerate(names):
        xs = [g + (n - 1) * width for g, values in enumerate(groups.values()) if values[n] is not None]
        ys = [values[n] for values in groups.values() if values[n] is not None]
        bar_labels(ax, ax.bar(xs, ys, width, color=f"C{n}", label=name))
    ax.set_xticks(range(len(groups)), list(groups))
    plain_log_y(ax)
    ax.set_ylim(bottom=5)
    ax.set(
        ylabel="images/s, log scale",
        title="what the service delivers against the engine alone and the host's preprocessing",
    )
    fig.legend(loc="outside lower center", ncols=2)
    return fig


@figure("peers", "peers.json", "gpu-h200.json")
def peers(anchors: Json, gpu: Json) -> Figure:
    rows = [
        (a["system"], a["conditions"], a["value"], a.get("value_high"), a["measures"])
        for a in anchors["figures"]
    ]
    square = gpu["engine"]["square-fp16"]["batches"]
    clients = ", ".join(str(p["concurrency"]) for p in gpu["http"]["square"]["points"])
    rows += [
        (
            "ours: engine alone, fp16",
            f"{gpu['device']['gpus'][0].split(',')[0]}, square kind, 32 per call, no decode",
            max(b["images_per_s"] for b in square),
            None,
            "inference only",
        ),
        (
            "ours: POST /predict",
            f"same host, {gpu['device']['cpus']} cores decoding; best of {clients} clients",
            max(p["images_per_s"] for p in gpu["http"]["square"]["points"]),
            None,
            "end to end, JPEG in",
        ),
    ]
    measures = list(dict.fromkeys(r[4] for r in rows))
    fig = Figure(figsize=(9, 0.42 * len(rows) + 1.2), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(rows)))[::-1]
    for y, (system, _, value, high, what) in zip(ys, rows, strict=True):
        colour = f"C{measures.index(what)}"
        bars = ax.barh(
            y, value, color=colour, hatch="//" if system.startswith("ours") else None, edgecolor="w"
        )
        label = f"{value:,.0f}"
        if high is not None:  # a published range: its upper part lighter, labelled at its end
            bars = ax.barh(y, high - value, left=value, color=colour, alpha=0.4)
            label = f"{value:,.0f}-{high:,.0f}"
        ax.bar_label(bars, labels=[label], padding=2, fontsize=7)
    ax.set_yticks(ys, [f"{r[0]}\n{r[1]}" for r in rows], fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlim(100, max(r[3] or r[2] for r in rows) * 4)
    handles = [Patch(color=f"C{n}", label=m) for n, m in enumerate(measures)]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    ax.set_xlabel("images (inferences, requests) per second, log scale")
    fig.suptitle("published figures of other systems, on their hardware, and ours (hatched)")
    return fig
