"""``alexnet-export``: weights (pretrained, checkpoint or random) -> ONNX model in the weights dir."""

import argparse
import logging
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path

from model_export.alexnet import LAYOUTS
from model_export.export import ExportError, export_onnx, make_version
from model_export.weights import (
    PRETRAINED_SHA256_PREFIX,
    PRETRAINED_URL,
    LoadedWeights,
    WeightsError,
    load_checkpoint,
    load_pretrained,
    random_weights,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alexnet-export",
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
        help="network layout (pretrained: torchvision; random: default paper; checkpoint: as recorded in it)",
    )
    p.add_argument("--checkpoint", type=Path, help="with --source checkpoint: the .pt/.pth file")
    p.add_argument("--seed", type=int, default=0, help="with --source random (default 0)")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("weights"),
        help="where models and the downloaded weights live (default: weights)",
    )
    p.add_argument("--output", type=Path, help="ONNX file to write (default: <weights-dir>/<version>.onnx)")
    p.add_argument("--input-size", type=int, default=224, help="crop side the network takes (default 224)")
    p.add_argument("--resize-size", type=int, default=256, help="shorter side before cropping (default 256)")
    p.add_argument("--url", default=PRETRAINED_URL, help="download URL of the pretrained weights (a mirror)")
    p.add_argument(
        "--sha256",
        default=PRETRAINED_SHA256_PREFIX,
        help="expected SHA-256 (or its prefix) of the pretrained file",
    )
    p.add_argument(
        "--features",
        action="store_true",
        help="also output fc7 after ReLU (4096-d per crop) for /embed, /gallery and /similar",
    )
    p.add_argument(
        "--triton",
        type=Path,
        metavar="REPO",
        help="also write a Triton model repository (REPO/alexnet/1/model.onnx + config.pbtxt)",
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
    return random_weights(args.layout or "paper", args.seed)


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
        f"  parity ONNX Runtime vs torch: max abs logit difference {result.max_abs_diff:.2e}"
    )
    if args.triton is not None:
        from model_export.triton import write_triton_repository

        config = write_triton_repository(result.path, meta, args.triton)
        print(f"  Triton model repository: {config.parent.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
