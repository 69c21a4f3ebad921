"""Baseline JPEGs decoded, resized and cut on the GPU, and fed to the session there.

nvImageCodec decodes a batch of JPEGs (the hardware JPEG decoder where the GPU has one, CUDA
otherwise) into device memory; a small ONNX graph on ONNX Runtime's CUDA provider resizes each
image's shorter side to S and cuts the central S x S square into its slot of one device batch
(IO binding: the decoded pixels and the squares never pass through host memory); the model's
session reads that batch in place (``OnnxClassifier.probabilities_bound``). Only probabilities
come back to the host. ``service.device_route`` decides which images come here.

Concurrent requests' images are gathered into one batch (``DeviceBatcher``). An image the device
decoder refuses is that image's 422, never the batch's or the engine's. Nothing here runs without
a GPU; ``benchmarks.gpu_check`` exercises it on one.
"""

import asyncio
import ctypes
import importlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from alexnet_core.images import ImageInputError
from alexnet_core.session import OnnxClassifier

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"


def square_geometry(width: int, height: int, resize: int) -> tuple[int, int, int, int]:
    """(new height, new width, top, left): the shorter side to ``resize``, then the central square,
    with ``alexnet_core.pipeline.center_square``'s sizes and rounding."""
    if width <= height:
        new_w, new_h = resize, max(resize, int(resize * height / width))
    else:
        new_w, new_h = max(resize, int(resize * width / height)), resize
    return new_h, new_w, round((new_h - resize) / 2.0), round((new_w - resize) / 2.0)


def square_graph() -> "onnx.ModelProto":
    """(H, W, 3) uint8 image, its new size, the square's corner and side -> (S, S, 3) uint8: a bilinear,
    antialiased resize at pixel centres (Pillow's BILINEAR, as the CPU path), then the cut."""
    from onnx import TensorProto, helper  # here only: built once, where the GPU path starts

    nodes = [
        helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node(
            "Resize",
            ["pixels", "", "", "size"],
            ["resized"],
            mode="linear",
            antialias=1,
            axes=[0, 1],
            coordinate_transformation_mode="half_pixel",
        ),
        helper.make_node("Add", ["corner", "side"], ["far"]),
        helper.make_node("Slice", ["resized", "corner", "far", "hw"], ["cut"]),
        helper.make_node("Round", ["cut"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "black", "white"], ["clipped"]),
        helper.make_node("Cast", ["clipped"], ["square"], to=TensorProto.UINT8),
    ]
    constants = [
        helper.make_tensor("hw", TensorProto.INT64, [2], [0, 1]),
        helper.make_tensor("black", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("white", TensorProto.FLOAT, [], [255.0]),
    ]
    graph = helper.make_graph(
        nodes,
        "center_square",
        [
            helper.make_tensor_value_info("image", TensorProto.UINT8, ["H", "W", 3]),
            helper.make_tensor_value_info("size", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("corner", TensorProto.INT64, [2]),
            helper.make_tensor_value_info("side", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("square", TensorProto.UINT8, ["S", "S", 3])],
        initializer=constants,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def _cuda_runtime() -> ctypes.CDLL:
    """The CUDA runtime that ONNX Runtime's CUDA provider has loaded (found by its soname)."""
    for name in ("libcudart.so.13", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("the CUDA runtime (libcudart.so.13) cannot be loaded")


class DeviceDecoder:
    """nvImageCodec's decoder and the square graph's session on one GPU. Not thread-safe: one
    batch at a time (``DeviceBatcher`` runs it on one thread)."""

    def __init__(self, device_id: int = 0) -> None:
        codec: Any = importlib.import_module("nvidia.nvimgcodec")
        self._codec, self.device_id = codec, device_id
        # fancy_upsampling: chroma upsampled as libjpeg-turbo does by default (the CPU path's),
        # for the agreement between the two paths.
        self._decoder = codec.Decoder(device_id=device_id, options=":fancy_upsampling=1")
        # sRGB interleaved output (the default colour spec); only unrotated JPEGs come here, and
        # the orientation is never applied twice.
        self._params = codec.DecodeParams(apply_exif_orientation=False)
        self._cudart = _cuda_runtime()
        self._stream = ctypes.c_void_p()
        if self._cudart.cudaStreamCreate(ctypes.byref(self._stream)) != 0:
            raise RuntimeError("cudaStreamCreate failed")
        providers = [(CUDA, {"device_id": str(device_id)})]
        options = ort.SessionOptions()
        # Every node on the GPU or no session: a node left to the CPU would copy each image to the
        # host and back, silently.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        graph = square_graph().SerializeToString()
        self._squares = ort.InferenceSession(graph, options, providers=providers)
        if CUDA not in self._squares.get_providers():
            got = self._squares.get_providers()
            raise RuntimeError(f"the square graph's session runs on {got}, not {CUDA}")

    def _streams(self, images: list[bytes]) -> list[Any]:
        """A code stream per image (None for one whose header nvImageCodec cannot parse)."""
        streams = []
        for data in images:
            try:
                streams.append(self._codec.CodeStream(data))
            except Exception:
                streams.append(None)
        return streams

    def _decoded(self, images: list[bytes]) -> list[Any]:
        """Device images (None for one the decoder refused), complete on return: the decode runs
        on this decoder's stream, which is synchronised before ONNX Runtime's stream reads it."""
        streams = self._streams(images)
        parsed = [stream for stream in streams if stream is not None]
        decoded = iter(self._decoder.decode(parsed, params=self._params, cuda_stream=self._stream.value or 0))
        if self._cudart.cudaStreamSynchronize(self._stream) != 0:
            raise RuntimeError("cudaStreamSynchronize failed after the decode")
        return [None if stream is None else next(decoded) for stream in streams]

    def _cut(self, image: Any, batch: ort.OrtValue, slot: int, resize: int) -> None:
        interface = image.__cuda_array_interface__
        height, width, channels = interface["shape"]
        contiguous = interface.get("strides") in (None, (width * channels, channels, 1))
        if channels != 3 or not contiguous:
            strides = interface.get("strides")
            raise ValueError(f"decoded image of shape {interface['shape']}, strides {strides}")
        new_h, new_w, top, left = square_geometry(width, height, resize)
        binding = self._squares.io_binding()
        pixels = interface["data"][0]
        binding.bind_input("image", "cuda", self.device_id, np.uint8, [height, width, 3], pixels)
        binding.bind_cpu_input("size", np.array([new_h, new_w], np.int64))
        binding.bind_cpu_input("corner", np.array([top, left], np.int64))
        binding.bind_cpu_input("side", np.array([resize, resize], np.int64))
        out = batch.data_ptr() + slot * resize * resize * 3
        binding.bind_output("square", "cuda", self.device_id, np.uint8, [resize, resize, 3], out)
        self._squares.run_with_iobinding(binding)

    def classify(self, classifier: OnnxClassifier, images: list[bytes]) -> tuple[np.ndarray, list[int]]:
        """Probabilities of the images the device decoded (in order) and the indices of those it
        refused."""
        decoded = self._decoded(images)
        refused = [i for i, image in enumerate(decoded) if image is None]
        good = [image for image in decoded if image is not None]
        if not good:
            return np.empty((0, classifier.metadata.num_classes), np.float32), refused
        resize = classifier.metadata.resize_size
        shape = [len(good), resize, resize, 3]
        batch = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.uint8, "cuda", self.device_id)
        for slot, image in enumerate(good):
            self._cut(image, batch, slot, resize)
        return classifier.probabilities_bound(batch), refused


class DeviceFailed(RuntimeError):
    """A device batch failed as a whole (not an image's fault): its requests take the CPU path."""


@dataclass
class _Job:
    classifier: OnnxClassifier
    images: list[bytes]
    labels: list[str]
    future: "asyncio.Future[DeviceResult]"


@dataclass
class DeviceResult:
    probabilities: np.ndarray
    seconds: float
    batch_images: int
    errors: dict[int, ImageInputError] = field(default_factory=dict)


class DeviceBatcher:
    """Concurrent requests' device-bound images in one decode and one inference call: up to
    ``max_images``, waiting at most ``max_delay_s`` for more after the first."""

    def __init__(self, decoder: DeviceDecoder, max_images: int, max_delay_s: float) -> None:
        self.decoder, self.max_images, self.max_delay_s = decoder, max_images, max_delay_s
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="device-decode")
        self._task: asyncio.Task[None] | None = None
        self._running: list[_Job] = []  # the batch in hand

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: "asyncio.Task[None]") -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("the device batcher stopped", exc_info=exc)
        # Nothing waits forever: the batch in hand and the queued ones fall back to the CPU path.
        while not self._queue.empty():
            self._running.append(self._queue.get_nowait())
        for job in self._running:
            if not job.future.done():
                job.future.set_exception(DeviceFailed("the device batcher stopped"))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def classify(
        self, classifier: OnnxClassifier, images: list[bytes], labels: list[str]
    ) -> DeviceResult:
        if self._task is None or self._task.done():
            raise DeviceFailed("the device batcher is not running")
        future: asyncio.Future[DeviceResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(classifier, images, labels, future))
        return await future

    async def _gather(self) -> list[_Job]:
        jobs = [await self._queue.get()]
        count = len(jobs[0].images)
        deadline = time.monotonic() + self.max_delay_s
        while count < self.max_images and (left := deadline - time.monotonic()) > 0:
            try:
                job = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                break
            jobs.append(job)
            count += len(job.images)
        return [job for job in jobs if not job.future.done()]  # a cancelled request's are dropped

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = self._running = await self._gather()
            # One model per call: a batch gathered across an activation runs as two calls.
            for classifier in {id(job.classifier): job.classifier for job in jobs}.values():
                mine = [job for job in jobs if job.classifier is classifier]
                images = [data for job in mine for data in job.images]
                started = time.perf_counter()
                try:
                    probs, refused = await loop.run_in_executor(
                        self._thread, self.decoder.classify, classifier, images
                    )
                except Exception as exc:
                    log.exception("a device batch of %d images failed", len(images))
                    for job in mine:
                        if not job.future.done():
                            job.future.set_exception(DeviceFailed(f"{type(exc).__name__}: {exc}"))
                    continue
                self._answer(mine, probs, refused, time.perf_counter() - started)

    @staticmethod
    def _answer(jobs: list[_Job], probs: np.ndarray, refused: list[int], seconds: float) -> None:
        """Each job's rows of ``probs`` (which lacks the refused images' rows) and its refusals."""
        refused_set, row, index = set(refused), 0, 0
        total = sum(len(job.images) for job in jobs)
        for job in jobs:
            mine: list[np.ndarray] = []
            errors: dict[int, ImageInputError] = {}
            for i in range(len(job.images)):
                if index in refused_set:
                    detail = "corrupt or unsupported JPEG data: the GPU decoder refused it"
                    errors[i] = ImageInputError(422, job.labels[i] + detail)
                else:
                    mine.append(probs[row])
                    row += 1
                index += 1
            result = DeviceResult(np.stack(mine) if mine else probs[:0], seconds, total, errors)
            if not job.future.done():
                job.future.set_result(result)
