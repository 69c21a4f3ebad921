"""``alexnet-export``: weights (pretrained, checkpoint or random) -> ONNX model in the weights dir."""

import argparse
import logging
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

from alexnet_core.settings import add_weights_dir
from alexnet_core.training import DEFAULT_LAYOUT, LAYOUTS
from model_export.export import (
    DEFAULT_INPUT_KIND,
    INPUT_KINDS,
    ExportError,
    ExportResult,
    export_onnx,
    make_version,
)
from model_export.weights import (
    PRETRAINED_SHA256_PREFIX,
    PRETRAINED_URL,
    LoadedWeights,
    WeightsError,
    load_checkpoint,
    load_pretrained,
    random_weights,
)


def onnx_path(text: str) -> Path:
    path = Path(text)
    if path.suffix != ".onnx":
        # The server lists *.onnx only: a model under another name would never be served.
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .onnx")
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-export",
        allow_abbrev=False,  # else --out would be taken for --output and name a file "out"
        description="Export AlexNet to one self-describing ONNX file that alexnet-serve can serve.",
        epilog="examples:\n"
        "  alexnet-export --source pretrained\n"
        "  alexnet-export --source checkpoint --checkpoint runs/digits/checkpoint.pt\n"
        "  alexnet-export --source random --layout paper --output /tmp/smoke.onnx",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        choices=("pretrained", "checkpoint", "random"),
        default="pretrained",
        help="official ImageNet weights (downloaded once, SHA-256 checked), a local "
        "checkpoint, or seeded random weights for smoke tests (default: pretrained)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=None,
        help=f"network layout (pretrained: torchvision; random: default {DEFAULT_LAYOUT}; checkpoint: as "
        "recorded in it)",
    )
    p.add_argument("--checkpoint", type=Path, help="with --source checkpoint: the .pt/.pth file")
    p.add_argument("--seed", type=int, default=0, help="with --source random (default 0)")
    add_weights_dir(p, "where models and the downloaded weights live")
    p.add_argument(
        "--output",
        type=onnx_path,
        help="ONNX file to write, ending in .onnx (default: <weights-dir>/<version>.onnx)",
    )
    p.add_argument("--input-size", type=int, default=224, help="crop side the network takes (default 224)")
    p.add_argument("--resize-size", type=int, default=256, help="shorter side before cropping (default 256)")
    p.add_argument("--url", default=PRETRAINED_URL, help="download URL of the pretrained weights (a mirror)")
    p.add_argument(
        "--sha256",
        default=PRETRAINED_SHA256_PREFIX,
        help="expected SHA-256 (or its prefix) of the pretrained file",
    )
    p.add_argument(
        "--input",
        dest="input_kind",
        choices=INPUT_KINDS,
        default=DEFAULT_INPUT_KIND,
        help="square: the model takes uint8 central squares (N, S, S, 3) and does the ten crops (five "
        "without mirrors for a checkpoint trained without flips), normalisation, softmax and mean "
        "in its graph, with a 'features' output (fc7); "
        "crops: it takes the host's normalised float crops and returns logits "
        f"(default: {DEFAULT_INPUT_KIND})",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help="--input crops: also output fc7 after ReLU (4096-d per crop) for /embed, /gallery and "
        "/similar (the square kind always has it)",
    )
    p.add_argument(
        "--triton",
        type=Path,
        metavar="REPO",
        help="also write a Triton model repository (REPO/alexnet/1/model.onnx + config.pbtxt)",
    )
    p.add_argument(
        "--triton-instance-kind",
        choices=("cpu", "gpu"),
        default=None,
        help="with --triton: where Triton runs the model "
        "(default: gpu if this host has a CUDA GPU, else cpu)",
    )
    return p


def load(args: argparse.Namespace) -> LoadedWeights:
    if args.source == "pretrained":
        if args.layout not in (None, "torchvision"):
            raise WeightsError("the pretrained weights exist for the torchvision layout only")
        return load_pretrained(args.weights_dir, args.url, args.sha256)
    if args.source == "checkpoint":
        if args.checkpoint is None:
            raise WeightsError("--source checkpoint needs --checkpoint PATH")
        return load_checkpoint(args.checkpoint, args.layout)
    return random_weights(args.layout or DEFAULT_LAYOUT, args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        weights = load(args)
        version = make_version(weights.model.layout, weights.source, datetime.now(UTC))
        output = args.output or args.weights_dir / f"{version}.onnx"
        result = export_onnx(
            weights,
            output,
            input_size=args.input_size,
            resize_size=args.resize_size,
            version=version if args.output is None else None,
            input_kind=args.input_kind,
            features=args.features,
        )
    except (WeightsError, ExportError) as exc:
        print(f"alexnet-export: error: {exc}", file=sys.stderr)
        return 1
    meta = result.metadata
    print(
        f"wrote {result.path} ({result.bytes / 2**20:.1f} MiB) in {result.seconds:.1f} s\n"
        f"  version {meta.version}, layout {meta.layout}, {meta.num_classes} classes, "
        f"source {meta.source}{'' if meta.trained else ' (UNTRAINED: predictions are meaningless)'}\n"
        f"  {_parity_line(result)}"
    )
    if args.triton is not None:
        from model_export.triton import write_triton_repository

        kind, why = _instance_kind(args.triton_instance_kind)
        config = write_triton_repository(result.path, meta, args.triton, instance_kind=kind)
        print(f"  Triton model repository: {config.parent.parent} (instance kind {kind}: {why})")
    return 0


def _parity_line(result: ExportResult) -> str:
    if result.metadata.input_kind == "square":
        return (
            f"input: uint8 central squares, {result.metadata.test_crops} crops in the graph; parity "
            f"with the host pipeline + torch: max abs probability difference {result.max_abs_diff:.2e}, "
            f"relative feature difference {result.max_feature_diff:.2e}"
        )
    return (
        "input: float crops; parity ONNX Runtime vs torch: max abs logit difference "
        f"{result.max_abs_diff:.2e}"
    )


def _instance_kind(choice: str | None) -> tuple[str, str]:
    """Triton's instance kind and why: a CPU-only Triton refuses a KIND_GPU model outright."""
    if choice is not None:
        return f"KIND_{choice.upper()}", "--triton-instance-kind"
    import torch

    if torch.cuda.is_available():
        return "KIND_GPU", "this host has a CUDA GPU; --triton-instance-kind cpu for a CPU-only Triton"
    return "KIND_CPU", "this host has no CUDA GPU; --triton-instance-kind gpu for a GPU Triton"


if __name__ == "__main__":
    raise SystemExit(main())
