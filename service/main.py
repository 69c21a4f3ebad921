"""Builds the FastAPI app; ``alexnet-serve`` runs it with uvicorn."""

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser
from starlette.routing import Match
from swagger_ui_bundle import swagger_ui_path

from alexnet_core.images import ImageInputError
from service.core.config import Settings, get_settings
from service.core.metrics import Metrics
from service.core.middleware import BodySizeLimit, QueueFullGate, RequestMetrics
from service.inference import InferenceQueue, Overloaded
from service.model_registry import ModelRegistry
from service.routers import ensemble, gallery, health, kernels, models, page, predict, train
from service.training_jobs import JobError, TrainingManager

log = logging.getLogger("service")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

DESCRIPTION = """
AlexNet (Krizhevsky, Sutskever, Hinton, 2012) on ONNX Runtime. `POST /predict` an image and get
its top-k classes: the image is resized (shorter side 256), its central 256x256 cut into the
paper's ten 224x224 crops (corners, centre, mirrors), and the ten softmax outputs averaged.
"""


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _mark_binary(node: object) -> None:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
            node.setdefault("format", "binary")
        for value in node.values():
            _mark_binary(value)
    elif isinstance(node, list):
        for value in node:
            _mark_binary(value)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    # Starlette spools an upload over 1 MiB to a temporary file, which the handler then reads back
    # whole (in a worker thread): a disk round trip for every 12 MP photo. The body limit already
    # bounds an upload, and its bytes are held in memory for decoding anyway. (Process-wide: the
    # attribute Starlette documents for this.)
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    metrics = Metrics()
    registry = ModelRegistry(settings)
    inference = InferenceQueue(
        metrics,
        batching=settings.batching,
        max_batch_images=settings.max_batch_images,
        max_batch_delay_s=settings.max_batch_delay_ms / 1000,
        max_queue_images=settings.max_queue_images,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="preprocess")
        app.state.preprocess_pool = pool
        await asyncio.to_thread(registry.load_at_startup)
        app.state.training = TrainingManager(settings.weights_dir, settings.data_root, registry)
        inference.start()
        try:
            yield
        finally:
            await app.state.training.shutdown()
            inference.stop()
            pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="alexnet-serve",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served below from local assets: the default loads them from a CDN
        redoc_url=None,
    )
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # Pydantic 2 describes uploads by contentMediaType only (OpenAPI 3.1); Swagger UI 5 needs
        # format: binary to offer file pickers for the items of `files` (else: text boxes).
        if app.openapi_schema is None:
            _mark_binary(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.registry = registry
    app.state.inference = inference

    app.include_router(predict.router)
    app.include_router(models.router)
    app.include_router(kernels.router)
    app.include_router(ensemble.router)
    app.include_router(gallery.router)
    app.include_router(page.router)
    app.include_router(train.router)
    app.include_router(health.router)

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

    @app.exception_handler(ImageInputError)
    async def image_error(request: Request, exc: ImageInputError) -> JSONResponse:
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(JobError)
    async def job_error(request: Request, exc: JobError) -> JSONResponse:
        return _error(exc.status_code, exc.detail)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # One readable sentence in `detail`, the structured list beside it.
        # A problem with the body as a whole (missing, not an object) has no field: say "body".
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in exc.errors()
        )
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse({"detail": f"invalid request: {problems}", "errors": errors}, status_code=422)

    # Starlette's own (404 no route, 405 wrong method) as well as FastAPI's subclass.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405 and headers and "Allow" in headers:
            # Starlette's Allow names the methods of the first route with this path only; GET and
            # POST /train are two routes. A 405 must list all of them (RFC 9110, 15.5.6).
            allowed = [
                m
                for m in HTTP_METHODS
                if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in app.routes)
            ]
            if allowed:  # else not a route's 405 (StaticFiles' own): its header is right
                headers = {**headers, "Allow": ", ".join(allowed)}
        return _error(exc.status_code, str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    # Outermost last: metrics see every answer, the gate refuses before the body limit reads.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(QueueFullGate, inference=inference)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def run() -> None:
    """``alexnet-serve``: one process, one model session (scale out with replicas, see README)."""
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )
