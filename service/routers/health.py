from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import MetricsDep, PreparationDep, RegistryDep
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers")
async def health() -> Health:
    return Health()


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Readiness: a model is loaded and warmed up, and images can be decoded",
)
async def ready(registry: RegistryDep, preparation: PreparationDep) -> Response:
    classifier = registry.current
    if classifier is None:
        body = Readiness(ready=False, reason=registry.not_ready_reason)
        return JSONResponse(body.model_dump(), status_code=503)
    preparation.decoder.check()  # replaces workers that died while idle
    if (why := preparation.decoder.unavailable) is not None:
        body = Readiness(ready=False, reason=f"{why}: the server cannot decode images; see its log")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(
        Readiness(ready=True, model_version=classifier.version, providers=classifier.providers).model_dump()
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep, registry: RegistryDep, preparation: PreparationDep) -> Response:
    preparation.decoder.check()  # the live workers' gauge counts the ones really running
    classifier = registry.current
    metrics.show_model(None if classifier is None else (classifier.version, ",".join(classifier.providers)))
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
