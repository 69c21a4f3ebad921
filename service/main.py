"""Builds the FastAPI app: the whole service in one process, or the engine process's app behind the
fronts (``service.front``). ``alexnet-serve`` (``service.cli``) runs them; ``service.main:app`` is
the one-process app for ``uvicorn`` run by hand (settings from the environment)."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import cache
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartParser
from swagger_ui_bundle import swagger_ui_path

from alexnet_core.resources import keep_freed_memory
from alexnet_core.session import OnnxClassifier
from service.admission import DecodeBudget, UploadBudget
from service.core import errors
from service.core.config import Settings, get_settings
from service.core.metrics import Metrics
from service.core.middleware import (
    ApiKeyGate,
    BodySizeLimit,
    BodyTimeout,
    QueueFullGate,
    RequestMetrics,
    RoomCheck,
)
from service.core.security import needs_key, scope_checker
from service.decoding import DecodePool
from service.device_decode import DeviceBatcher
from service.device_route import CUDA, DeviceDecodeUnavailable, decode_device
from service.engine.local import Engine, LocalEngine
from service.engine.server import EngineServer
from service.image_admission import ImageAdmission
from service.inference import InferenceQueue
from service.model_registry import ModelRegistry
from service.preparation import Preparation
from service.routers import ensemble, gallery, health, kernels, models, page, predict, train
from service.routers import v2 as open_inference
from service.shared_state import ENGINE_ROW, SharedState
from service.state_storage import open_state, read_only_reason, start_training
from service.tallies import DECODE_BYTES, DECODING, IMAGES, Tally

log = logging.getLogger(__name__)
DESCRIPTION = """
AlexNet (Krizhevsky, Sutskever, Hinton, 2012) on ONNX Runtime. `POST /predict` an image and get
its top-k classes: the image is resized (shorter side 256), its central 256x256 cut into the
paper's ten 224x224 crops (corners, centre, mirrors), and the ten softmax outputs averaged. A model
trained without flips (where a mirror changes the class) gets the five crops without mirrors.
"""


# How the app reaches its engine: ``LocalEngine`` in this process, or another implementation of
# the protocol with the same arguments (``service.cluster``: the engine replicas of a Ray cluster).
EngineFactory = Callable[[Settings, ModelRegistry, InferenceQueue, Preparation, Metrics], Engine]

ROUTERS = (
    predict.router,
    models.router,
    kernels.router,
    ensemble.router,
    gallery.router,
    page.router,
    train.router,
    health.router,
    open_inference.router,
)


def _add_routes(app: FastAPI) -> None:
    """The API routers, the page's assets and Swagger UI from local assets."""
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static/swagger-ui", StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    app.mount("/static/page", page.assets, name="page")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="alexnet-serve - Swagger UI",
            swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
        )


def add_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, room: RoomCheck, upload_tally: Tally | None
) -> None:
    """The gates every request passes in the process that receives it (a front, or the one
    process). ``upload_tally``: where the upload budget is counted."""
    # Outermost last: metrics see every answer; CORS headers go on every answer, the gates'
    # refusals included (a browser hides an answer without them from the page); the gates refuse
    # before the body is read; the body limits count and time what is read.
    app.add_middleware(UploadBudget, limit=settings.upload_memory_bytes, metrics=metrics, tally=upload_tally)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(BodyTimeout, timeout_s=settings.body_timeout_s)
    app.add_middleware(QueueFullGate, inference=room)
    keyed = [route for router in ROUTERS for route in router.routes if needs_key(route)]
    app.add_middleware(ApiKeyGate, routes=keyed, check=scope_checker(settings))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(RequestMetrics, metrics=metrics)


def _primary_middleware(app: FastAPI, settings: Settings) -> None:
    """Behind the fronts, which have counted, limited and timed each request already: the key
    gate stays (the engine's socket is the server's own, but a route must not rely on that)."""
    keyed = [route for router in ROUTERS for route in router.routes if needs_key(route)]
    app.add_middleware(ApiKeyGate, routes=keyed, check=scope_checker(settings))


def create_app(
    settings: Settings | None = None,
    shared: SharedState | None = None,
    registry: ModelRegistry | None = None,
    engine: EngineFactory = LocalEngine,
) -> FastAPI:
    """The whole service in this process; with ``shared``, the engine process's app (the fronts
    send it every request they do not run themselves, and their images through ``EngineServer``).
    ``registry`` and ``engine``: where the model is known and run when not in this process."""
    settings = settings or get_settings()
    allow_large_uploads_in_memory(settings)
    metrics = Metrics()
    registry = registry or ModelRegistry(settings)
    tally = (lambda field: shared.tallies.tally(ENGINE_ROW, field)) if shared else (lambda field: None)
    decode_budget = DecodeBudget(settings.decode_memory_bytes, metrics, tally(DECODE_BYTES))
    admission = ImageAdmission(metrics, settings.max_queue_images, tally(IMAGES), tally(DECODING))
    inference = InferenceQueue(
        metrics,
        admission,
        batching=settings.batching,
        max_batch_images=settings.max_batch_images,
        max_batch_delay_s=settings.max_batch_delay_ms / 1000,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keep_freed_memory()
        pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        app.state.preprocess_pool = pool
        # Behind fronts this process decodes only the images of the feature-search routes.
        workers = min(2, settings.decode_workers) if shared else settings.decode_workers
        decoder = DecodePool(workers, settings.decode_timeout_s, metrics)
        app.state.preparation = Preparation(settings, pool, decoder, decode_budget)
        app.state.engine = engine(settings, registry, inference, app.state.preparation, metrics)
        # Where the state cannot be written, training, galleries and activation answer 503.
        app.state.read_only = registry.read_only = await asyncio.to_thread(read_only_reason, settings)
        database, watcher = await asyncio.to_thread(open_state, settings, registry)
        app.state.database = database
        await asyncio.gather(asyncio.to_thread(registry.load_at_startup), decoder.warm_up())
        inference.max_batch_images = batch_limit(settings, registry.current)
        device = await start_device(app.state.engine, settings, shared is not None)
        watcher.start()  # replicas follow activations: the shared history, else the ACTIVE file
        app.state.training = await asyncio.to_thread(start_training, settings, registry, database)
        inference.start()
        fronts = None
        if shared:
            fronts = app.state.fronts = EngineServer(shared.engine_socket, registry, inference, pool)
            await fronts.start()
        try:
            yield
        finally:
            if fronts is not None:
                fronts.stop()
            watcher.stop()
            if app.state.training is not None:
                await app.state.training.shutdown()
            inference.stop()
            if device is not None:
                device.stop()
            decoder.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            registry.close()

    app = _new_app(lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.inference = inference
    app.state.fronts = None
    app.state.read_only = None  # why the server cannot write its state: found at start-up
    _add_routes(app)
    errors.install(app)
    if shared:
        _primary_middleware(app, settings)
    else:
        add_middleware(app, settings, metrics, admission, None)
    return app


def _new_app(lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    return FastAPI(
        title="alexnet-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from local assets (_add_routes): the default loads them from a CDN
        redoc_url=None,
    )


def batch_limit(settings: Settings, classifier: OnnxClassifier | None) -> int:
    """Most images per inference call: ``device_batch_images`` where the session runs on CUDA and
    ``max_batch_images`` was left at its CPU default, else ``max_batch_images``."""
    on_cuda = classifier is not None and CUDA in classifier.providers
    if on_cuda and "max_batch_images" not in settings.model_fields_set:
        return settings.device_batch_images
    return settings.max_batch_images


async def start_device(engine: Engine, settings: Settings, behind_fronts: bool) -> DeviceBatcher | None:
    """The engine's GPU decode path, started (None where it is not taken: also where the engine is
    elsewhere, as a Ray cluster's, and this process only decodes on the CPU for it)."""
    if not isinstance(engine, LocalEngine):
        return None
    device = engine.device = await asyncio.to_thread(device_batcher, settings, behind_fronts)
    if device is not None:
        device.start()
    return device


def device_batcher(settings: Settings, behind_fronts: bool) -> DeviceBatcher | None:
    """The GPU decode path where ALEXNET_DECODE_DEVICE resolves to cuda (raises, and the server
    does not start, where cuda is asked and not possible), else None."""
    workers = 1 if behind_fronts else 0
    if decode_device(settings.decode_device, settings.providers, workers) == "cpu":
        return None
    from service.device_decode import DeviceDecoder

    try:
        decoder = DeviceDecoder()
    except Exception as exc:  # installed but not working (driver, nvJPEG library)
        if settings.decode_device == "cuda":
            why = f"ALEXNET_DECODE_DEVICE=cuda, but nvImageCodec fails: {exc}"
            raise DeviceDecodeUnavailable(why) from exc
        log.warning("GPU decode not available (%s): JPEGs are decoded on the CPU", exc)
        return None
    log.info("baseline JPEGs are decoded on the GPU (nvImageCodec)")
    return DeviceBatcher(decoder, settings.device_batch_images, settings.max_batch_delay_ms / 1000)


def allow_large_uploads_in_memory(settings: Settings) -> None:
    # Starlette spools an upload over `spool_max_size` (1 MiB) to a temporary file, which the
    # handler then reads back whole: a disk round trip for every photo, and bytes left on disk.
    # The class attribute is the only setting Starlette offers for it (`Request.form`'s
    # `max_part_size` bounds text fields, FastAPI's `form_limits` counts parts); the body limit
    # already bounds what an upload can hold in memory. Process-wide, so the largest limit wins.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)


@cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    # `service.main:app`, built on first access (PEP 562): importing `create_app` reads no
    # settings. No model is loaded here; the lifespan loads it when the server starts.
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
