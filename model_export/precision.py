"""Optional precision variants of an exported model: int8 for CPU, fp16 for CUDA.

Each variant is a complete alexnet-serve model file (same labels, sizes and normalisation in its
``metadata_props``) with its own version, ``<source version>-int8`` / ``-fp16``, written beside the
source atomically. It is *not* activated: serve it with ``ALEXNET_MODEL=<version>`` or
``POST /model/activate``, after checking its top-1 agreement with the source (``top1_agreement``).

Measured on a 2-core Zen 4 (see /work/shared/notes/export-and-inference-findings.md): quantising
every layer makes the convolutions ``ConvInteger``, 3-5x *slower* than fp32; quantising only the
fully connected layers (``MatMul``, 90 % of AlexNet's weights, per output channel) is faster and
the file shrinks from 233 to 65 MiB. fp16 is meant for CUDA (tensor cores); ORT's CPU provider
runs it too, by casting around the kernels it lacks.

    python -m model_export.precision weights/alexnet-...onnx --int8 --fp16
"""

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from alexnet_core import files, model_files

INT8_SUFFIX = "-int8"
FP16_SUFFIX = "-fp16"
# The fp32 validation figures do not describe a variant; they are kept under these names.
_VALIDATION_KEYS = ("validation_top1", "validation_top5")


def variant_path(onnx_path: Path, suffix: str) -> Path:
    """``<weights dir>/<source stem><suffix>.onnx``: the registry matches versions to file stems."""
    return onnx_path.with_name(f"{onnx_path.stem}{suffix}.onnx")


def _retag(proto: onnx.ModelProto, source: onnx.ModelProto, precision: str, suffix: str) -> str:
    """Copy the source's alexnet-serve metadata onto ``proto`` with a new version; returns it."""
    props = {p.key: p.value for p in source.metadata_props}
    if "version" not in props:
        raise ValueError("the source model carries no alexnet-serve metadata; export it with alexnet-export")
    source_version = json.loads(props["version"])
    version = f"{source_version}{suffix}"
    props["version"] = json.dumps(version)
    # Extra keys are ignored by ModelMetadata.from_props but stay readable (Netron, onnx.load).
    props["precision"] = json.dumps(precision)
    props["variant_of"] = json.dumps(source_version)
    for key in _VALIDATION_KEYS:
        if key in props:
            props[f"fp32_{key}"] = props.pop(key)
    props.pop("precision_check", None)  # the variant's own check (set by the conversion), if any
    # Tools add their own keys (the quantiser writes onnx.infer); keep those too.
    extra = {p.key: p.value for p in proto.metadata_props if p.key not in props}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**extra, **props})
    return version


def _save_atomically(proto: onnx.ModelProto, out_path: Path, source_path: Path) -> None:
    # Without ALEXNET_MODEL or an ACTIVE file the service serves the *newest* *.onnx. A variant
    # written now would be newer than its source and so served by default, i.e. activated by
    # accident; dating it just before its source keeps the source in front of it.
    files.atomic_write(
        out_path, lambda tmp: onnx.save_model(proto, tmp), mtime_ns=source_path.stat().st_mtime_ns - 1_000_000
    )
    model_files.write_manifest(out_path)


def _write_variant(
    onnx_path: Path,
    out_path: Path | None,
    precision: str,
    suffix: str,
    convert: Callable[[onnx.ModelProto, onnx.ModelProto], onnx.ModelProto],
) -> Path:
    """The variant ``convert`` makes of (a copy of the source, the source), retagged and saved at
    ``out_path`` (default: beside the source, named with ``suffix``)."""
    onnx_path = Path(onnx_path)
    out_path = Path(out_path) if out_path is not None else variant_path(onnx_path, suffix)
    source = onnx.load(onnx_path)
    model = onnx.ModelProto()
    model.CopyFrom(source)
    proto = convert(model, source)
    _retag(proto, source, precision, suffix)
    _save_atomically(proto, out_path, onnx_path)
    return out_path


def quantize_int8(onnx_path: Path, out_path: Path | None = None) -> Path:
    """Dynamic int8 quantisation of the fully connected layers only (per output channel)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def quantize(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
        # The dynamo exporter records Gemm output shapes that the quantiser's Gemm -> MatMul rewrite
        # makes stale ("ShapeInferenceError (9216) vs (4096)"); ORT infers them again at load time.
        del model.graph.value_info[:]
        with tempfile.TemporaryDirectory() as tmp:
            quantized = Path(tmp) / "int8.onnx"
            quantize_dynamic(
                model,
                quantized,
                # Conv stays fp32: ConvInteger is 3-5x slower than ORT's fp32 convolutions on CPU.
                op_types_to_quantize=["MatMul"],
                # One scale per output neuron: the FC weights' ranges differ a lot between neurons.
                per_channel=True,
                # reduce_range (7-bit weights) only matters on CPUs without VNNI, where u8*s8
                # products can saturate; AVX-512 VNNI and AVX-VNNI machines do not need it.
                reduce_range=False,
                weight_type=QuantType.QInt8,
            )
            return onnx.load(quantized)

    return _write_variant(onnx_path, out_path, "int8", INT8_SUFFIX, quantize)


def _fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes of a square-kind graph kept in float32: the normalisation of the uint8 square (fp16
    would round (x - mean) / std to 3 digits before conv1 sees it) and the softmax and ten-crop
    means after the last Gemm (fp16 would round the probabilities and features it averages).
    The network between them runs in fp16. None for the crops kind."""
    nodes = list(model.graph.node)  # the exporter writes them in topological order
    if not any(i.type.tensor_type.elem_type == onnx.TensorProto.UINT8 for i in model.graph.input):
        return []
    first_slice = next(i for i, node in enumerate(nodes) if node.op_type == "Slice")
    last_gemm = max(i for i, node in enumerate(nodes) if node.op_type == "Gemm")
    head = [node.name for node in nodes[:first_slice]]
    tail = [
        node.name for node in nodes[last_gemm + 1 :] if node.op_type in ("Softmax", "Reshape", "ReduceMean")
    ]
    return head + tail


def _keep_fp32_between_blocked_nodes(proto: onnx.ModelProto, source: onnx.ModelProto) -> None:
    """The converter casts every blocked node's output to fp16 and back for the next blocked node,
    and stores their float constants as fp16 (123.675 becomes 123.6875): undo both, so that a
    chain of float32 nodes really stays float32. A Cast to fp16 read only by Casts to float32
    becomes nothing (those Casts become Identity, which ORT removes); a Cast to float32 of a
    constant that was float32 in the source reads the source's value again."""
    graph = proto.graph
    original = {i.name: i for i in source.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    def identity(node: onnx.NodeProto, source_name: str) -> None:
        node.op_type, node.input[0] = "Identity", source_name
        del node.attribute[:]

    dropped = []
    for node in graph.node:
        if cast_to(node) == onnx.TensorProto.FLOAT16 and node.output[0] not in outputs:
            readers = consumers.get(node.output[0], [])
            if readers and all(cast_to(r) == onnx.TensorProto.FLOAT for r in readers):
                for reader in readers:
                    identity(reader, node.input[0])
                dropped.append(node)
        elif cast_to(node) == onnx.TensorProto.FLOAT and node.input[0] in original:
            constant = initializers[node.input[0]]
            if all(cast_to(r) == onnx.TensorProto.FLOAT for r in consumers[constant.name]):
                constant.CopyFrom(original[constant.name])
                identity(node, constant.name)
    for node in dropped:
        graph.node.remove(node)


# The agreement an fp16 variant must show with its source on ``check_images`` to be served by
# default on CUDA (``service.model_registry``): nearly every top-1 the same, and no class's
# probability moved by more than the bound.
FP16_MIN_TOP1 = 0.99
FP16_MAX_DELTA_P = 0.02
CHECK_IMAGE_SET = "64 seeded synthetic JPEGs (model_export.precision.check_images)"


def check_images(count: int = 64, seed: int = 0) -> list[bytes]:
    """A stated, reproducible image set for the fp16 check, made without data files: smooth random
    colour fields (low-resolution noise upsampled) with random rectangles and ellipses, 200-480
    pixels a side, saved as JPEGs of quality 75-95."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(200, 481, 2))
        field = rng.integers(0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 7))):
            x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
            y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1 + 1, y1 + 1), fill=colour)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
        out.append(buffer.getvalue())
    return out


def _probabilities(path: Path, images: Sequence[bytes], providers: list[str]) -> np.ndarray:
    from alexnet_core.session import OnnxClassifier

    classifier = OnnxClassifier(Path(path), providers, warm_up=False)
    meta = classifier.metadata
    rows = []
    for start in range(0, len(images), 8):
        batch = [meta.preprocess(data, max_pixels=64_000_000).batch for data in images[start : start + 8]]
        rows.append(classifier.probabilities(np.concatenate(batch)))
    return np.concatenate(rows).astype(np.float64)


def fp16_check(
    source: Path, variant: Path, images: Sequence[bytes], providers: list[str] | None = None
) -> dict[str, object]:
    """The variant's agreement with its source on ``images``: top-1 agreement, the largest and the
    mean |delta p| over every class, and whether it passes ``FP16_MIN_TOP1`` / ``FP16_MAX_DELTA_P``."""
    providers = providers or ["CPUExecutionProvider"]
    reference, half = (_probabilities(path, images, providers) for path in (source, variant))
    delta = np.abs(reference - half)
    top1 = float(np.mean(reference.argmax(1) == half.argmax(1)))
    largest = float(delta.max())
    return {
        "images": len(images),
        "top1_agreement": round(top1, 4),
        "max_abs_delta_p": float(f"{largest:.3g}"),
        "mean_abs_delta_p": float(f"{delta.mean():.3g}"),
        "min_top1_agreement": FP16_MIN_TOP1,
        "max_abs_delta_p_bound": FP16_MAX_DELTA_P,
        "providers": providers,
        "passed": top1 >= FP16_MIN_TOP1 and largest <= FP16_MAX_DELTA_P,
    }


def convert_fp16(
    onnx_path: Path, out_path: Path | None = None, check: Sequence[bytes] | None = None, image_set: str = ""
) -> Path:
    """fp16 weights and activations (for CUDA), the input and outputs as in the source (float32,
    or the square kind's uint8 input, normalised in float32). With ``check`` (images), the
    variant's agreement with the source on them (``fp16_check``, on the CPU) is recorded in its
    metadata as ``precision_check``: the service serves it by default on CUDA only if it passed."""
    # onnxruntime ships the converter (onnxruntime.transformers.float16, the same code as
    # onnxconverter-common's), so this adds no dependency to the serving install.
    from onnxruntime.transformers.float16 import convert_float_to_float16

    def convert(model: onnx.ModelProto, source: onnx.ModelProto) -> onnx.ModelProto:
        # keep_io_types: Cast nodes at the edges, so the service's float32 batches and its softmax
        # over float32 logits work unchanged (the square kind's uint8 input is no float: it stays).
        blocked = _fp32_nodes(model)
        proto = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
        if blocked:
            _keep_fp32_between_blocked_nodes(proto, source)
        if check is not None:
            with tempfile.TemporaryDirectory() as tmp:
                candidate = Path(tmp) / "fp16.onnx"  # still carries the source's metadata
                onnx.save_model(proto, candidate)
                result = {"image_set": image_set or f"{len(check)} given images"}
                result |= fp16_check(Path(onnx_path), candidate, check)
            onnx.helper.set_model_props(
                proto,
                {**{p.key: p.value for p in proto.metadata_props}, "precision_check": json.dumps(result)},
            )
        return proto

    return _write_variant(onnx_path, out_path, "fp16", FP16_SUFFIX, convert)


def top1_agreement(
    reference_onnx: Path,
    variant_onnx: Path,
    images: Sequence[bytes],
    *,
    providers: list[str] | None = None,
    batch_images: int = 8,
) -> float:
    """Fraction of ``images`` whose top-1 class is the same for both models, each run through
    the service's own preprocessing (ten crops, averaged softmax) and ``OnnxClassifier``."""
    from alexnet_core.session import OnnxClassifier

    if not images:
        raise ValueError("top1_agreement needs at least one image")
    providers = providers or ["CPUExecutionProvider"]
    top1: list[np.ndarray] = []
    for path in (reference_onnx, variant_onnx):
        classifier = OnnxClassifier(Path(path), providers, warm_up=False)
        meta = classifier.metadata
        classes = []
        for start in range(0, len(images), batch_images):
            crops = [
                meta.preprocess(data, max_pixels=64_000_000).batch
                for data in images[start : start + batch_images]
            ]
            classes.append(classifier.probabilities(np.concatenate(crops)).argmax(axis=1))
        top1.append(np.concatenate(classes))
        del classifier  # one ~300 MiB session at a time
    return float(np.mean(top1[0] == top1[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m model_export.precision",
        description="Write int8 (CPU) and/or fp16 (CUDA) variants of an exported model beside it. "
        "Variants are not activated: choose one with ALEXNET_MODEL or POST /model/activate.",
    )
    p.add_argument("model", type=Path, help="an .onnx file written by alexnet-export")
    p.add_argument("--int8", action="store_true", help="dynamic int8 quantisation of the FC layers")
    p.add_argument("--fp16", action="store_true", help="fp16 weights and activations, float32 I/O")
    p.add_argument(
        "--check",
        type=Path,
        nargs="+",
        metavar="IMAGE",
        help="image files: print each variant's top-1 agreement with the source on them",
    )
    p.add_argument(
        "--providers",
        default="CPUExecutionProvider",
        help="execution providers for --check, comma-separated (default: CPUExecutionProvider)",
    )
    args = p.parse_args(argv)
    if not (args.int8 or args.fp16):
        p.error("nothing to do: give --int8 and/or --fp16")
    if not args.model.is_file():
        p.error(f"{args.model} does not exist")
    written = []
    images = [path.read_bytes() for path in args.check or []]
    if args.int8:
        written.append(quantize_int8(args.model))
    if args.fp16:
        # Its agreement with the source, recorded in it: on CUDA it is served by default if it passed.
        check, image_set = (
            (images, f"{len(images)} --check images") if images else (check_images(), CHECK_IMAGE_SET)
        )
        written.append(convert_fp16(args.model, check=check, image_set=image_set))
    providers = [name.strip() for name in args.providers.split(",") if name.strip()]
    for path in written:
        line = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); ALEXNET_MODEL={path.stem}"
        if images:
            agreement = top1_agreement(args.model, path, images, providers=providers)
            line += f", top-1 agreement {agreement:.1%} on {len(images)} images"
        print(line)
    print("not activated: serve one with ALEXNET_MODEL=<version> or POST /model/activate", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
