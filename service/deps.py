"""Dependencies injected into the routers: the app's shared objects, from ``app.state``.

They are ``async def`` because they never block: FastAPI runs a plain ``def`` dependency in a
worker thread, which for these attribute lookups would cost a thread hand-off each per request."""

from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from alexnet_core.session import OnnxClassifier
from service.core.config import Settings
from service.core.metrics import Metrics
from service.engine.local import Engine, ServedModel
from service.model_registry import ModelRegistry
from service.preparation import Preparation


def _app_state(name: str) -> Callable[[Request], Coroutine[Any, Any, Any]]:
    """A dependency that returns ``app.state.<name>`` (typed where it is used, by ``Annotated``)."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    dependency.__name__ = f"get_{name}"
    return dependency


get_settings = _app_state("settings")
get_registry = _app_state("registry")
get_metrics = _app_state("metrics")
get_pool = _app_state("preprocess_pool")
get_preparation = _app_state("preparation")
get_engine = _app_state("engine")


async def get_served(engine: Annotated[Engine, Depends(get_engine)]) -> ServedModel:
    """The model in service when the request arrives (503 while there is none)."""
    return engine.served()


async def get_classifier(registry: Annotated[ModelRegistry, Depends(get_registry)]) -> OnnxClassifier:
    """The model in service at the moment the request arrives; it serves the whole request
    even if another model is activated meanwhile."""
    classifier = registry.current
    if classifier is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"no model loaded: {registry.not_ready_reason}"
        )
    return classifier


async def single_file_part(request: Request) -> None:
    """400 for a form with two ``file`` parts: FastAPI would keep the last one and drop the other
    without a word. The form is the one FastAPI has already parsed (Starlette caches it)."""
    sent = len((await request.form()).getlist("file"))
    if sent > 1:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"form field `file` sent {sent} times: send one image as `file`, several as `files`",
        )


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PoolDep = Annotated[ThreadPoolExecutor, Depends(get_pool)]
PreparationDep = Annotated[Preparation, Depends(get_preparation)]
ClassifierDep = Annotated[OnnxClassifier, Depends(get_classifier)]
EngineDep = Annotated[Engine, Depends(get_engine)]
ServedDep = Annotated[ServedModel, Depends(get_served)]
