"""A front process: HTTP, multipart, the request gates and the images' decoding for ``/predict``
and the Open Inference Protocol, with inference in the engine process (``RemoteEngine``); every
other request goes to the engine process's app (``PrimaryProxy``). Fronts load no model."""

import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.routing import Route

from alexnet_core.resources import keep_freed_memory
from service.admission import DecodeBudget
from service.core import errors
from service.core.config import Settings
from service.core.metrics import Metrics
from service.decoding import DecodePool
from service.engine.link import EngineLink
from service.engine.protocol import Segment
from service.engine.remote import RemoteEngine
from service.image_admission import ImageAdmission
from service.main import ROUTERS, add_middleware, allow_large_uploads_in_memory
from service.preparation import Preparation
from service.proxy import PrimaryProxy
from service.routers import predict
from service.routers import v2 as open_inference
from service.schemas import Health, Readiness
from service.shared_state import SharedState, front_row
from service.tallies import DECODE_BYTES, DECODING, IMAGES, UPLOAD_BYTES

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def decode_workers_per_front(settings: Settings) -> int:
    return max(1, -(-settings.decode_workers // settings.workers))


def create_front_app(settings: Settings, shared: SharedState, index: int) -> FastAPI:
    allow_large_uploads_in_memory(settings)
    metrics = Metrics()
    row = front_row(index)

    def tally(field: int):
        return shared.tallies.tally(row, field)

    admission = ImageAdmission(metrics, settings.max_queue_images, tally(IMAGES), tally(DECODING))
    budget = DecodeBudget(settings.decode_memory_bytes, metrics, tally(DECODE_BYTES))
    # A front replaced after a crash finds its predecessor's slots: the engine has let go of them.
    path = shared.slots_path(index)
    path.unlink(missing_ok=True)
    segment = Segment(path, settings.max_queue_images, create=True)
    link = EngineLink(shared.engine_socket, segment)
    all_routes = [route for router in ROUTERS for route in router.routes]
    proxy = PrimaryProxy(shared.primary_socket, all_routes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keep_freed_memory()
        pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="parse")
        app.state.preprocess_pool = pool
        decoder = DecodePool(decode_workers_per_front(settings), settings.decode_timeout_s, metrics)
        preparation = app.state.preparation = Preparation(settings, pool, decoder, budget)
        app.state.engine = RemoteEngine(settings, link, admission, preparation, metrics)
        await decoder.warm_up()
        link.start()
        # The port answers once the engine does (it loads the model first), as a server of one
        # process does: a client that sees /health answer can send its images.
        await link.announced.wait()
        try:
            yield
        finally:
            await link.stop()
            decoder.stop()
            pool.shutdown(wait=True, cancel_futures=True)
            await proxy.aclose()
            with contextlib.suppress(OSError):
                path.unlink()

    app = FastAPI(title="alexnet-serve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.proxy = proxy

    @app.get("/health", response_model=Health, include_in_schema=False)
    async def health() -> Health:
        return Health()  # this front answers

    @app.get("/ready", include_in_schema=False)
    async def ready(request: Request) -> Response:
        """Ready when this front can reach the engine and knows its model; the engine says the rest."""
        reason = None if link.model is not None else link.not_ready_reason
        decoder = request.app.state.preparation.decoder
        decoder.check()  # replaces workers that died while idle
        if reason is None and (why := decoder.unavailable) is not None:
            reason = f"{why}: this front cannot decode images; see its log"
        if reason is not None:
            return JSONResponse(Readiness(ready=False, reason=reason).model_dump(), status_code=503)
        return await proxy.handle(request)

    app.include_router(predict.router)
    app.include_router(open_inference.router)
    app.router.routes.append(Route("/{path:path}", proxy.handle, methods=METHODS, include_in_schema=False))
    errors.install(app)
    add_middleware(app, settings, metrics, admission, tally(UPLOAD_BYTES))
    return app
