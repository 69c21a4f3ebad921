"""The one entry point the routes use for inference: ``await engine.run(model, images, ...)``.

It owns the pipeline ``decode_request -> batch -> predict -> unbatch``: admission (places in the
queue, within the request's time limit), decoding in the killable workers against the decode
budget, the batcher and the session; cancelled with the request when its client goes away. Routes
only parse their input and shape the answer. ``LocalEngine`` runs it in this process (the engine
process, or a server of one process); ``service.engine.remote.RemoteEngine`` in a front process,
with the same calls.
"""

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from fastapi import HTTPException, Request, status

from alexnet_core.images import DecodeCost, ImageInputError, decode_cost
from alexnet_core.metadata import ModelMetadata
from alexnet_core.session import OnnxClassifier
from service.core.config import Settings
from service.core.metrics import Metrics
from service.decoding import DecodedSquare
from service.device_decode import DeviceBatcher, DeviceFailed
from service.device_route import Route, route
from service.inference import InferenceQueue
from service.model_registry import ModelRegistry
from service.preparation import Preparation, unless_disconnected


class ServedModel(Protocol):
    """What a route knows of the model in service (an ``OnnxClassifier``, or a front's view)."""

    @property
    def version(self) -> str: ...

    @property
    def metadata(self) -> ModelMetadata: ...


@dataclass
class EngineResult:
    probabilities: np.ndarray  # (images, classes)
    features: np.ndarray | None  # (images, dim) when asked for
    decode_s: list[float]  # per image
    preprocess_s: list[float]
    seconds: float  # the inference call
    batch_images: int  # images in that call, this request's and others'
    squares: list[np.ndarray] | None = None  # the decoded central squares, when asked for

    @classmethod
    def of_decoded(
        cls, answer: "Answer", decoded: list[DecodedSquare], cut_s: float = 0.0, keep_squares: bool = False
    ) -> "EngineResult":
        """``answer`` to images the decode workers squared: their timings (``cut_s`` per image
        added to their squaring), and their squares where ``keep_squares``."""
        return cls(
            answer.probabilities,
            answer.features,
            [each.decode_s for each in decoded],
            [each.square_s + cut_s for each in decoded],
            answer.seconds,
            answer.batch_images,
            [each.pixels for each in decoded] if keep_squares else None,
        )


class Answer(Protocol):
    """An inference call's answer, wherever the engine runs."""

    probabilities: np.ndarray
    features: np.ndarray | None
    seconds: float
    batch_images: int


class Engine(Protocol):
    def served(self) -> ServedModel: ...

    async def run(
        self,
        model: Any,
        images: list[bytes],
        labels: list[str],
        *,
        features: bool = False,
        cancel_on: Request | None = None,
    ) -> EngineResult: ...

    async def run_tensor(self, model: Any, batch: np.ndarray, images: int) -> EngineResult: ...


def no_model(reason: str) -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, f"no model loaded: {reason}", {"Retry-After": "1"}
    )


async def cancelled_with(
    request: Request | None, work: "Coroutine[Any, Any, EngineResult]", metrics: Metrics
) -> EngineResult:
    if request is None:
        return await work
    return await unless_disconnected(request, asyncio.create_task(work), metrics)


class LocalEngine:
    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        inference: InferenceQueue,
        preparation: Preparation,
        metrics: Metrics,
        device: DeviceBatcher | None = None,
    ) -> None:
        self.settings, self.registry, self.inference = settings, registry, inference
        self.preparation, self.metrics = preparation, metrics
        self.device = device  # the GPU decode path, where ALEXNET_DECODE_DEVICE resolved to cuda

    def served(self) -> OnnxClassifier:
        """The model in service when the request arrives; it serves the whole request even if
        another is activated meanwhile."""
        classifier = self.registry.current
        if classifier is None:
            raise no_model(self.registry.not_ready_reason)
        return classifier

    async def run(
        self,
        model: OnnxClassifier,
        images: list[bytes],
        labels: list[str],
        *,
        features: bool = False,
        squares: bool = False,
        cancel_on: Request | None = None,
    ) -> EngineResult:
        """The images' answers: admitted, decoded in the workers, batched, run. ``squares``: keep
        the decoded central squares in the result (a gallery's thumbnail is made from its square)."""

        async def work() -> EngineResult:
            inference, meta = self.inference, model.metadata
            if self.device is not None and meta.input_kind == "square" and not (features or squares):
                loop = asyncio.get_running_loop()
                routes = await loop.run_in_executor(self.preparation.pool, _routes, images)
                if all(each.device for each in routes):
                    try:
                        return await self._on_device(model, images, labels, routes)
                    except DeviceFailed:  # logged by the batcher; the CPU workers can still answer
                        pass
            admit = inference.admission.admit_within
            async with admit(len(images), self.settings.request_timeout_s) as admission:
                decoded = await self.preparation.decoded_squares(meta, images, labels, [None] * len(images))
                started = time.perf_counter()
                batch = await self.preparation.model_input(meta, [each.pixels for each in decoded])
                cut_s = (time.perf_counter() - started) / len(images)
                result = await inference.infer(admission, model, batch, features)
            return EngineResult.of_decoded(result, decoded, cut_s, keep_squares=squares)

        return await cancelled_with(cancel_on, work(), self.metrics)

    async def _on_device(
        self, model: OnnxClassifier, images: list[bytes], labels: list[str], routes: list[Route]
    ) -> EngineResult:
        """A request of baseline JPEGs only: admitted, its headers' decode memory (the full-size
        image and its float copy on the device) reserved against the decode budget, then decoded,
        cut and run on the GPU with other requests' images."""
        assert self.device is not None
        settings, budget = self.settings, self.preparation.budget
        costs = await asyncio.get_running_loop().run_in_executor(
            self.preparation.pool, _weighed, images, labels, model.metadata.resize_size, settings
        )
        # The device decodes at full size (no draft scale): the image and its float32 copy.
        pairs = zip(costs, routes, strict=True)
        held = sum(max(cost.bytes, each.width * each.height * 15) for cost, each in pairs)
        async with self.inference.admission.admit_within(len(images), settings.request_timeout_s):
            budget.reserve(held)
            try:
                result = await self.device.classify(model, images, labels)
            finally:
                budget.release(held)
        if result.errors:
            raise result.errors[min(result.errors)]
        per_image = result.seconds / max(result.batch_images, 1)
        return EngineResult(
            result.probabilities,
            None,
            [per_image] * len(images),
            [0.0] * len(images),
            result.seconds,
            result.batch_images,
        )

    async def run_tensor(self, model: OnnxClassifier, batch: np.ndarray, images: int) -> EngineResult:
        """The model's own input (Open Inference Protocol tensors), through the same batcher."""
        async with self.inference.admission.admit_within(
            images, self.settings.request_timeout_s
        ) as admission:
            result = await self.inference.infer(admission, model, batch)
        return EngineResult(
            result.probabilities, None, [0.0] * images, [0.0] * images, result.seconds, result.batch_images
        )


def _routes(images: list[bytes]) -> list[Route]:
    return [route(data) for data in images]


def _weighed(images: list[bytes], labels: list[str], resize: int, settings: Settings) -> list[DecodeCost]:
    """Each image's header weighed as for the CPU path (pixel limit, JPEG scans), its file named
    in a refusal."""
    costs = []
    for data, label in zip(images, labels, strict=True):
        try:
            costs.append(decode_cost(data, resize, settings.max_pixels, settings.max_jpeg_scans))
        except ImageInputError as exc:
            raise ImageInputError(exc.status_code, label + exc.detail) from None
    return costs
