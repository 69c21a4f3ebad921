"""The paper's ensemble (its 5-CNN average) as one model version: one ONNX graph holding the
members side by side on one shared input, averaging their softmax outputs.

Built with the ``onnx`` package only (no torch), so the service can build one too. Each member's
nodes, edges and initializers get a prefix (``m0_``, ``m1_``, …); the members' logits each go
through a Softmax, a Mean averages them, and a Log makes the graph's ``logits`` output. The service
applies a softmax to ``logits`` as for any crops-kind model, and softmax(log(p)) = p because the
mean of probabilities sums to 1: the ensemble is served, batched and cropped like one model.
Members of the square kind (crops in the graph) already output the crops' mean probabilities: a
Mean of those is the ensemble's ``probabilities``. All members take the same crops (``test_crops``:
the paper's ten, or five without mirrors for models trained without flips): the ensemble is
served with one crop set, so members trained with and without flips are refused together.
One graph rather than members run one after another: one inference call per batch, and ONNX
Runtime schedules the members' layers within it.

    python -m model_export.ensemble --weights-dir weights VERSION VERSION [VERSION …] [--version NAME]
"""

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from alexnet_core import files, model_files
from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import probabilities
from alexnet_core.settings import add_weights_dir

MAX_MEMBERS = 8  # ONNX protobuf files stop at 2 GiB; an AlexNet is about 230 MiB
# Not mean and std: models trained with different seeds estimate the channel means from different
# samples of the training images, so the merge adapts each member's input instead (see adapt_input).
SAME = ("labels", "input_size", "resize_size", "input_name", "input_kind", "test_crops")
PARITY_TOLERANCE = 1e-5


class EnsembleError(ValueError):
    pass


def read_metadata(model: onnx.ModelProto, name: str) -> ModelMetadata:
    try:
        return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    except ValueError as exc:
        raise EnsembleError(f"{name}: {exc}") from None


def check_members(metas: list[ModelMetadata]) -> None:
    if not 2 <= len(metas) <= MAX_MEMBERS:
        raise EnsembleError(f"an ensemble takes 2 to {MAX_MEMBERS} members, not {len(metas)}")
    versions = [m.version for m in metas]
    if len(set(versions)) != len(versions):
        raise EnsembleError(f"a member is listed twice: {versions}")
    first = metas[0]
    for meta in metas:
        for field in SAME:
            if getattr(meta, field) != getattr(first, field):
                raise EnsembleError(
                    f"{meta.version} and {first.version} differ in {field}: one input and one label list "
                    "must serve all members (same classes, sizes, kind and test crops: models trained "
                    "with and without flips take different crops)"
                )


def renormalisation(first: ModelMetadata, meta: ModelMetadata) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift), each (1, 3, 1, 1), that turn crops normalised with ``first``'s mean and std
    into crops normalised with ``meta``'s: (x * s0 + m0 - m) / s. None where nothing changes: the
    normalisations agree, or the member takes uint8 squares and normalises in its own graph."""
    if meta.input_kind == "square" or (meta.mean, meta.std) == (first.mean, first.std):
        return None
    m0, s0 = np.asarray(first.mean, np.float64), np.asarray(first.std, np.float64)
    m, s = np.asarray(meta.mean, np.float64), np.asarray(meta.std, np.float64)
    as_nchw = lambda v: v.astype(np.float32).reshape(1, -1, 1, 1)  # noqa: E731
    return as_nchw(s0 / s), as_nchw((m0 - m) / s)


def adapt_input(model: onnx.ModelProto, prefix: str, first: ModelMetadata, meta: ModelMetadata) -> None:
    """A member whose normalisation differs from the first member's reads the shared input through
    a Mul and an Add that renormalise it (exact up to float32 rounding)."""
    if (affine := renormalisation(first, meta)) is None:
        return
    graph, adapted = model.graph, f"{prefix}{meta.input_name}"
    for node in graph.node:
        node.input[:] = [adapted if name == meta.input_name else name for name in node.input]
    scale = numpy_helper.from_array(affine[0], f"{prefix}renorm_scale")
    shift = numpy_helper.from_array(affine[1], f"{prefix}renorm_shift")
    graph.initializer.extend([scale, shift])
    graph.node.insert(0, helper.make_node("Mul", [meta.input_name, scale.name], [f"{prefix}scaled"]))
    graph.node.insert(1, helper.make_node("Add", [f"{prefix}scaled", shift.name], [adapted]))


def merge(models: list[onnx.ModelProto], metas: list[ModelMetadata]) -> onnx.ModelProto:
    """The members' graphs on one input, their softmax outputs averaged (see the module doc)."""
    first = metas[0]
    square = first.input_kind == "square"
    nodes, initializers, softmaxes = [], [], []
    for i, (model, meta) in enumerate(zip(models, metas, strict=True)):
        prefix = f"m{i}_"
        onnx.compose.add_prefix(model, prefix, rename_inputs=False, inplace=True)
        adapt_input(model, prefix, first, meta)
        graph = model.graph
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        if square:  # already the mean of the softmax over the crops
            softmaxes.append(prefix + meta.output_name)
        else:
            softmaxes.append(f"{prefix}probabilities")
            nodes.append(helper.make_node("Softmax", [prefix + meta.output_name], [softmaxes[-1]], axis=1))
    if square:
        nodes.append(helper.make_node("Mean", softmaxes, [first.output_name], name="ensemble_mean"))
    else:
        nodes.append(helper.make_node("Mean", softmaxes, ["ensemble_mean"], name="ensemble_mean"))
        nodes.append(helper.make_node("Log", ["ensemble_mean"], [first.output_name], name="ensemble_log"))
    rows = "images" if square else "crops"
    graph = helper.make_graph(
        nodes,
        "ensemble",
        [models[0].graph.input[0]],
        [helper.make_tensor_value_info(first.output_name, TensorProto.FLOAT, [rows, first.num_classes])],
        initializer=initializers,
    )
    merged = helper.make_model(graph, opset_imports=list(models[0].opset_import))
    merged.ir_version = models[0].ir_version
    return merged


def check_parity(output: Path, members: list[Path], metas: list[ModelMetadata]) -> float:
    """Max abs difference between the ensemble's probabilities and the mean of its members'."""
    meta = metas[0]
    rng = np.random.default_rng(0)
    if meta.input_kind == "square":
        size = meta.resize_size
        batch = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
        # The square kind's output is already probabilities (softmax, mean over the crops).
        as_probabilities = lambda out: out.astype(np.float64)  # noqa: E731
    else:
        size = meta.input_size
        batch = rng.standard_normal((2 * meta.test_crops, 3, size, size), dtype=np.float32)
        as_probabilities = lambda out: probabilities(out, meta.test_crops)  # noqa: E731
    cpu = ["CPUExecutionProvider"]

    def run(path: Path, own: ModelMetadata) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=cpu)
        affine = renormalisation(meta, own)  # each member fed the batch as its own normalisation makes it
        x = batch if affine is None else batch * affine[0] + affine[1]
        return as_probabilities(session.run([meta.output_name], {meta.input_name: x})[0])

    expected = np.mean([run(p, own) for p, own in zip(members, metas, strict=True)], axis=0)
    return float(np.abs(run(output, meta) - expected).max())


def build_ensemble(members: list[Path], output: Path, version: str | None = None) -> ModelMetadata:
    """Write the ensemble of ``members`` (model files) to ``output`` atomically, checked against
    the members run one by one before it appears."""
    models = [onnx.load(str(p)) for p in members]
    metas = [read_metadata(m, p.name) for m, p in zip(models, members, strict=True)]
    check_members(metas)
    first = metas[0]
    metadata = first.model_copy(
        update={
            "version": version or output.stem,
            "source": "ensemble",
            "source_sha256": None,
            "trained": all(m.trained for m in metas),
            "exported_at": datetime.now(UTC),
            "validation_top1": None,
            "validation_top5": None,
            # The members' crops are one set (checked); their flips agree, or are not one record.
            "train_flip": first.train_flip if len({m.train_flip for m in metas}) == 1 else None,
            "features_output": None,
            "members": [m.version for m in metas],
        }
    )
    merged = merge(models, metas)
    del models
    helper.set_model_props(merged, metadata.to_props())
    onnx.checker.check_model(merged)

    def write_checked(tmp: Path) -> None:
        onnx.save_model(merged, str(tmp))
        diff = check_parity(tmp, members, metas)
        if not diff <= PARITY_TOLERANCE:
            raise EnsembleError(f"the ensemble disagrees with its members' average by {diff:.3g}")

    files.atomic_write(output, write_checked)
    model_files.write_manifest(output)  # the SHA-256 the service checks before serving it
    return metadata


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="alexnet-ensemble", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("members", nargs="+", help="model versions (file stems) in the weights directory")
    add_weights_dir(p, "where the members are and the ensemble goes")
    p.add_argument("--version", help="the ensemble's version (default: ensemble-<UTC time>)")
    args = p.parse_args(argv)
    version = args.version or f"ensemble-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    paths = [args.weights_dir / f"{m.removesuffix('.onnx')}.onnx" for m in args.members]
    output = args.weights_dir / f"{version}.onnx"
    try:
        if missing := [str(x) for x in paths if not x.is_file()]:
            raise EnsembleError(f"no such model file: {', '.join(missing)}")
        if output.exists():
            raise EnsembleError(f"{output} exists")
        meta = build_ensemble(paths, output, version)
    except (EnsembleError, OSError, onnx.checker.ValidationError) as exc:
        print(f"alexnet-ensemble: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB): ensemble of {', '.join(meta.members)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
