"""One ONNX Runtime session around one exported model file."""

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from alexnet_core import files
from alexnet_core.metadata import ModelMetadata
from alexnet_core.pipeline import probabilities

log = logging.getLogger(__name__)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    # All graph rewrites (constant folding, Conv+ReLU fusion, layout changes): the default, but
    # stated because everything below relies on the fused graph.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # One session serves every request and the batcher calls it from one thread, so all cores go
    # to intra-op parallelism inside each Conv/Gemm; 0 means one thread per physical core.
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle intra-op workers sleep instead of spinning: a spinning worker holds a core that the
    # decoding threads and the event loop need between and during calls (``--tune`` on 2 cores:
    # 2-23 % less server CPU per image at the same or better throughput; no loss to ORT alone).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The arena keeps activation buffers between calls of similar batch sizes instead of
    # returning them to the allocator each time (default, kept on purpose).
    options.enable_cpu_mem_arena = True
    return options


def provider_list(names: list[str]) -> list[str | tuple[str, dict[str, str]]]:
    available = set(ort.get_available_providers())
    providers: list[str | tuple[str, dict[str, str]]] = []
    for name in names:
        if name not in available:
            log.warning("execution provider %s is not in this onnxruntime build; skipped", name)
        elif name == "CUDAExecutionProvider":
            # Exhaustive cuDNN algorithm search once per input shape: the batcher sends few
            # distinct shapes, so the one-off cost buys the fastest convolution kernels.
            providers.append((name, {"cudnn_conv_algo_search": "EXHAUSTIVE"}))
        else:
            providers.append(name)
    if not providers:
        providers.append("CPUExecutionProvider")
    return providers


def probe_providers(providers: list[str]) -> list[str]:
    """The providers a session gets here, from a one-node graph: a host without a working CUDA
    is told in a second rather than after minutes of exports."""
    from onnx import TensorProto, helper

    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value], [])
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=provider_list(providers))
    return session.get_providers()


PROBE_IMAGES = 2  # more than one: a graph that ignores the batch size shows it
PROBABILITY_TOLERANCE = 1e-2  # float16 variants sum their softmax rows to 1 within a few 1e-3


class ContractError(ValueError):
    """A model that loads and runs but does not answer what the service relies on."""


def check_contract(probs: np.ndarray, meta: ModelMetadata, images: int) -> None:
    """``probs``, the probabilities for ``images`` probe images, are what the pipeline needs:
    shape (images, classes), finite, each row in [0, 1] summing to 1."""
    broken = f"model {meta.version} breaks the output contract:"
    expected = (images, meta.num_classes)
    if probs.shape != expected:
        raise ContractError(f"{broken} it answers shape {probs.shape} for {images} images, not {expected}")
    values = probs.astype(np.float64)
    if not np.isfinite(values).all():
        raise ContractError(f"{broken} its output is not finite (NaN or infinity) for a blank image")
    sums, low, high = values.sum(axis=1), values.min(), values.max()
    if np.abs(sums - 1).max() > PROBABILITY_TOLERANCE:
        raise ContractError(
            f"{broken} its rows sum to {sums.min():.3g}..{sums.max():.3g}, not to 1 "
            f"({meta.input_kind} kind: a square-kind model must return probabilities, not logits)"
        )
    if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
        raise ContractError(
            f"{broken} its probabilities lie in [{low:.3g}, {high:.3g}], not in [0, 1] "
            f"({meta.input_kind} kind; a square-kind model must end in a softmax)"
        )


class OnnxClassifier:
    """An exported AlexNet: its metadata and one warmed-up ``InferenceSession``."""

    def __init__(
        self, path: Path, providers: list[str], intra_op_threads: int = 0, warm_up: bool = True
    ) -> None:
        self.path = path
        self.sha256 = files.sha256(path)
        self.session = ort.InferenceSession(
            str(path), session_options(intra_op_threads), providers=provider_list(providers)
        )
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        self._check_output_width()
        # ONNX Runtime falls back to CPU silently when CUDA libraries are missing: only the
        # session knows which providers it really got.
        self.providers: list[str] = self.session.get_providers()
        if "CUDAExecutionProvider" in providers and "CUDAExecutionProvider" not in self.providers:
            log.warning(
                "CUDAExecutionProvider was requested but the session runs on %s "
                "(CUDA 13 / cuDNN 9 libraries not found, or no GPU)",
                self.providers,
            )
        if warm_up:
            self.warm_up()
        log.info(
            "loaded model %s (%s, %d classes) on %s",
            self.version,
            self.metadata.layout,
            self.metadata.num_classes,
            self.providers,
        )

    def _check_output_width(self) -> None:
        # A label list that does not match the outputs would load, then fail every prediction.
        meta = self.metadata
        output = next((o for o in self.session.get_outputs() if o.name == meta.output_name), None)
        if output is None:
            raise ValueError(f"the model has no output {meta.output_name!r} (its metadata names it)")
        width = output.shape[-1] if output.shape else None
        if isinstance(width, int) and width != meta.num_classes:
            raise ValueError(
                f"the model's output {meta.output_name!r} has {width} classes but its metadata lists "
                f"{meta.num_classes} labels: export it again with matching labels"
            )

    @property
    def version(self) -> str:
        return self.metadata.version

    def warm_up(self) -> None:
        """Runs a probe batch of two images and checks the output contract on it: a model that
        loads but answers another shape, non-finite values or (square kind) rows that are no
        probabilities would fail every request; it is refused here like a corrupt file."""
        # The first run allocates buffers and (on CUDA) picks kernels; pay it before serving.
        meta = self.metadata
        if meta.input_kind == "square":
            size = meta.resize_size
            probe = np.zeros((PROBE_IMAGES, size, size, 3), dtype=np.uint8)
        else:
            size = meta.input_size
            probe = np.zeros((PROBE_IMAGES * meta.test_crops, 3, size, size), dtype=np.float32)
        check_contract(self.probabilities(probe), meta, PROBE_IMAGES)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(n*crops, 3, C, C) crops -> (n*crops, classes) logits: the crops kind only (a square-kind
        graph averages inside and returns probabilities)."""
        meta = self.metadata
        if meta.input_kind != "crops":
            raise ValueError(f"model {meta.version} takes central squares and returns probabilities only")
        # No I/O binding: the crops are made in host memory per request and the logits are needed
        # there for the softmax, so binding would only move the same two copies into ORT's hands.
        return self.session.run([meta.output_name], {meta.input_name: batch})[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """The concatenated ``Preprocessed.batch`` of n images -> (n, classes): the average over
        each image's crops (the paper's ten, or the five without mirrors: ``test_crops``), on the
        host for the crops kind, in the graph for the square kind."""
        meta = self.metadata
        if meta.input_kind == "square":
            return self.session.run([meta.output_name], {meta.input_name: batch})[0]
        return probabilities(self.logits(batch), meta.test_crops)

    def probabilities_bound(self, squares: ort.OrtValue) -> np.ndarray:
        """A square-kind model's probabilities for a batch of squares already on the device (the
        GPU decode path): bound in place, no copy through host memory."""
        meta = self.metadata
        if meta.input_kind != "square":
            raise ValueError(f"model {meta.version} takes crops: the device path feeds square-kind models")
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(meta.input_name, squares)
        binding.bind_output(meta.output_name)  # on the host: the answer is wanted there
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def features(self, batch: np.ndarray) -> np.ndarray:
        """(n, 4096): each image's last hidden layer (fc7 after ReLU), averaged over its crops."""
        return self.outputs(batch)[1]

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and features of n images from one run (the model must have features)."""
        meta = self.metadata
        if meta.features_output is None:
            raise ValueError(f"model {meta.version} has no features output; export it again")
        out, features = self.session.run([meta.output_name, meta.features_output], {meta.input_name: batch})
        if meta.input_kind == "square":
            return out, features
        crops = meta.test_crops
        probs = probabilities(out, crops)
        if features.shape[0] == out.shape[0]:  # one row per crop: the mean over an image's crops here
            features = features.reshape(-1, crops, features.shape[1]).mean(axis=1, dtype=np.float64)
        return probs, features.astype(np.float32)
