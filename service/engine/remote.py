"""The engine as a front process sees it: the same calls as ``LocalEngine``, with the images
decoded by this front's own workers straight into its shared slots, and the batch and the session
in the engine process (``service.engine.link``). Admission, the decode budget and the queue bound
are the server's, shared by every front (``service.tallies``)."""

from typing import Any

import numpy as np
from fastapi import Request

from service.core.config import Settings
from service.core.metrics import Metrics
from service.engine import protocol as p
from service.engine.link import EngineLink, EngineRefused, EngineUnavailable, ModelView
from service.engine.local import EngineResult, cancelled_with, no_model
from service.image_admission import ImageAdmission
from service.preparation import Preparation


class TensorElsewhere(Exception):
    """A tensor the front sends on to the engine process's app as it came (``PrimaryProxy``)."""


class RemoteEngine:
    def __init__(
        self,
        settings: Settings,
        link: EngineLink,
        admission: ImageAdmission,
        preparation: Preparation,
        metrics: Metrics,
    ) -> None:
        self.settings, self.link, self.admission = settings, link, admission
        self.preparation, self.metrics = preparation, metrics

    def served(self) -> ModelView:
        model = self.link.model
        if model is None:
            raise no_model(self.link.not_ready_reason)
        return model

    @staticmethod
    def _fits(model: ModelView) -> None:
        meta = model.metadata
        if (
            meta.resize_size > p.MAX_SQUARE
            or meta.num_classes > p.MAX_CLASSES
            or model.feature_dim > p.FEATURES
        ):
            raise EngineUnavailable(
                f"model {meta.version} ({meta.resize_size}-pixel squares, {meta.num_classes} classes) is "
                f"larger than the front processes' slots ({p.MAX_SQUARE} pixels, {p.MAX_CLASSES} classes): "
                "serve it with ALEXNET_WORKERS=0 (one process)"
            )

    async def run(
        self,
        model: ModelView,
        images: list[bytes],
        labels: list[str],
        *,
        features: bool = False,
        cancel_on: Request | None = None,
    ) -> EngineResult:
        self._fits(model)

        async def work() -> EngineResult:
            side, link = model.metadata.resize_size, self.link
            async with self.admission.admit_within(len(images), self.settings.request_timeout_s) as admission:
                slots = link.take_slots(len(images))
                try:
                    outs = [link.segment.square(slot, side) for slot in slots]
                    decoded = await self.preparation.decoded_squares(model.metadata, images, labels, outs)
                except BaseException:
                    link.give_back(slots)
                    raise
                self.admission.handed_over(admission)
                answer = await self._answer(model, slots, features)
            return EngineResult.of_decoded(answer, decoded)

        return await cancelled_with(cancel_on, work(), self.metrics)

    async def _answer(self, model: ModelView, slots: list[int], features: bool) -> Any:
        try:
            return await self.link.run(model, slots, features)
        except EngineRefused as exc:
            if exc.status == p.MODEL_GONE:
                raise EngineUnavailable(f"{exc}: send it again") from None
            if exc.status == p.BUSY:
                raise EngineUnavailable(str(exc)) from None
            raise RuntimeError(str(exc)) from None

    async def run_tensor(self, model: ModelView, batch: np.ndarray, images: int) -> EngineResult:
        """Open Inference Protocol tensors: the square kind's input is the images' squares."""
        self._fits(model)
        if model.metadata.input_kind != "square":
            raise TensorElsewhere  # ten float crops an image: larger than a slot
        side, link = model.metadata.resize_size, self.link
        async with self.admission.admit_within(images, self.settings.request_timeout_s) as admission:
            slots = link.take_slots(images)
            for slot, square in zip(slots, batch, strict=True):
                link.segment.square(slot, side)[:] = square
            self.admission.handed_over(admission)
            answer = await self._answer(model, slots, False)
        return EngineResult(
            answer.probabilities, None, [0.0] * images, [0.0] * images, answer.seconds, answer.batch_images
        )
