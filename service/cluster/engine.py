"""Inference across a Ray cluster: ``EngineReplica`` (one per GPU) holds the model sessions and
the project's batcher; ``RayEngine``, the ``Engine`` protocol in an HTTP front replica, decodes a
request's images there and sends their central squares to an engine replica as one numpy array
(through Ray's object store: shared memory between replicas on one node)."""

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import Request
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from alexnet_core.session import OnnxClassifier
from service.cluster.model import Description, FrontModel
from service.core.config import Settings
from service.core.metrics import Metrics
from service.embedding import feature_dim
from service.engine.local import EngineResult, cancelled_with, no_model
from service.image_admission import ImageAdmission, Overloaded, ServiceUnavailable
from service.inference import InferenceQueue, InferenceResult
from service.model_registry import ModelRegistry
from service.preparation import Preparation, input_batch

log = logging.getLogger(__name__)
# A replica that ended under the request (its node removed, its process killed): the request is
# sent again once, to another replica, with its squares already decoded.
REPLICA_GONE = (ActorDiedError, ActorUnavailableError)


class EngineReplica:
    """An engine replica: the models the app's config named (the one served and the one before,
    which requests sent just before an activation still name), and the batcher in front of them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        metrics = Metrics()
        self.admission = ImageAdmission(metrics, settings.max_queue_images, None, None)
        self.inference = InferenceQueue(
            metrics,
            self.admission,
            batching=settings.batching,
            max_batch_images=settings.max_batch_images,
            max_batch_delay_s=settings.max_batch_delay_ms / 1000,
        )
        self.inference.start()
        self.pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="crops")
        self.registry = ModelRegistry(settings)
        self.models: dict[str, OnnxClassifier] = {}  # by file name
        self.loading: dict[str, asyncio.Future[OnnxClassifier]] = {}
        self.serving: str | None = None

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """The app's config changed (or this replica started): load the model it names fully,
        then serve it. A model that fails to load leaves the served one in place."""
        name = str(config["model"])
        try:
            await self._model(name)
        except Exception:
            log.exception("cannot load model %s: still serving %s", name, self.serving)
            return
        previous, self.serving = self.serving, name
        for old in [n for n in self.models if n not in (name, previous)]:
            del self.models[old]
        log.info("engine replica now serves %s", name)

    async def _model(self, name: str) -> OnnxClassifier:
        """The model of that file name, loaded once however many requests ask meanwhile."""
        if (classifier := self.models.get(name)) is not None:
            return classifier
        future = self.loading.get(name)
        if future is None:
            future = self.loading[name] = asyncio.ensure_future(asyncio.to_thread(self._load, name))
            future.add_done_callback(lambda _: self.loading.pop(name, None))
        classifier = await asyncio.shield(future)
        self.models.setdefault(name, classifier)
        return classifier

    def _load(self, name: str) -> OnnxClassifier:
        return self.registry._load(self.registry.find(name))  # loaded, hashed and warmed

    async def describe(self, name: str) -> Description:
        """The model loaded here (an activation checks it so), as a front shows it."""
        classifier = await self._model(name)
        props = classifier.session.get_modelmeta().custom_metadata_map
        width = feature_dim(classifier) if classifier.metadata.features_output else None
        verified = self.registry.is_verified(classifier.path)
        return Description(name, dict(props), classifier.sha256, classifier.providers, width, verified)

    async def infer(self, name: str, squares: np.ndarray, features: bool) -> InferenceResult:
        """The answers for a request's central squares (images, side, side, 3 uint8)."""
        classifier = await self._model(name)
        images = len(squares)
        async with self.admission.admit_within(images, self.settings.request_timeout_s) as admission:
            meta = classifier.metadata
            if meta.input_kind == "square":
                batch = squares
            else:
                loop = asyncio.get_running_loop()
                batch = await loop.run_in_executor(self.pool, input_batch, meta, list(squares))
            return await self.inference.infer(admission, classifier, batch, features)

    async def infer_tensor(self, name: str, batch: np.ndarray, images: int) -> InferenceResult:
        """The model's own input (Open Inference Protocol tensors)."""
        classifier = await self._model(name)
        async with self.admission.admit_within(images, self.settings.request_timeout_s) as admission:
            return await self.inference.infer(admission, classifier, batch)

    def __del__(self) -> None:
        self.inference.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)


class RayEngine:
    """The ``Engine`` protocol in a front replica: admission and decoding here, the batch and the
    session on an engine replica reached through its deployment handle."""

    def __init__(
        self,
        handle: DeploymentHandle,
        settings: Settings,
        registry: ModelRegistry,
        inference: InferenceQueue,
        preparation: Preparation,
        metrics: Metrics,
    ) -> None:
        self.handle, self.settings, self.registry = handle, settings, registry
        self.admission: ImageAdmission = inference.admission
        self.preparation, self.metrics = preparation, metrics

    def served(self) -> FrontModel:
        model = self.registry.current
        if model is None:
            raise no_model(self.registry.not_ready_reason)
        return model  # type: ignore[return-value]

    async def run(
        self,
        model: FrontModel,
        images: list[bytes],
        labels: list[str],
        *,
        features: bool = False,
        squares: bool = False,
        cancel_on: Request | None = None,
    ) -> EngineResult:
        async def work() -> EngineResult:
            timeout = self.settings.request_timeout_s
            async with self.admission.admit_within(len(images), timeout) as admission:
                outs: list[np.ndarray | None] = [None] * len(images)
                decoded = await self.preparation.decoded_squares(model.metadata, images, labels, outs)
                self.admission.handed_over(admission)
                batch = np.stack([each.pixels for each in decoded])
                result = await self._call("infer", model.path.name, batch, features)
            return EngineResult.of_decoded(result, decoded, keep_squares=squares)

        return await cancelled_with(cancel_on, work(), self.metrics)

    async def run_tensor(self, model: FrontModel, batch: np.ndarray, images: int) -> EngineResult:
        async with self.admission.admit_within(images, self.settings.request_timeout_s) as admission:
            self.admission.handed_over(admission)
            result = await self._call("infer_tensor", model.path.name, batch, images)
        return EngineResult(
            result.probabilities, None, [0.0] * images, [0.0] * images, result.seconds, result.batch_images
        )

    async def _call(self, method: str, *args: Any) -> InferenceResult:
        for attempt in range(2):
            try:
                return await getattr(self.handle, method).remote(*args)
            except REPLICA_GONE:
                if attempt:
                    why = "the engine replicas are restarting: send the request again"
                    raise ServiceUnavailable(why) from None
                log.warning("an engine replica ended under a request: sending it to another")
            except (BackPressureError, DeploymentUnavailableError) as exc:
                raise Overloaded(f"the engine replicas are busy or starting: {exc}") from None
            except RayTaskError as exc:
                if isinstance(exc.cause, ServiceUnavailable):  # the engine replica's own bound, or stopping
                    raise ServiceUnavailable(str(exc.cause)) from None
                raise
        raise AssertionError("unreachable")
