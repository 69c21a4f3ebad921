import asyncio

from fastapi import APIRouter, HTTPException, status

from alexnet_core.session import OnnxClassifier
from service.core.security import ApiKey
from service.deps import ClassifierDep, RegistryDep, SettingsDep
from service.model_registry import ModelNotFound
from service.schemas import ActivateRequest, ErrorResponse, ModelInfo, ValidationErrorResponse

router = APIRouter(prefix="/model", tags=["model"])


def model_info(classifier: OnnxClassifier, requested: list[str], versions: list[str]) -> ModelInfo:
    meta = classifier.metadata
    return ModelInfo(
        version=meta.version,
        layout=meta.layout,
        num_classes=meta.num_classes,
        labels_sample=meta.labels[:10],
        source=meta.source,
        source_sha256=meta.source_sha256,
        trained=meta.trained,
        sha256=classifier.sha256,
        file=classifier.path.name,
        input_size=meta.input_size,
        resize_size=meta.resize_size,
        mean=meta.mean,
        std=meta.std,
        exported_at=meta.exported_at,
        validation_top1=meta.validation_top1,
        validation_top5=meta.validation_top5,
        providers_requested=requested,
        providers=classifier.providers,
        available_versions=versions,
        members=meta.members,
    )


@router.get(
    "", response_model=ModelInfo, responses={503: {"model": ErrorResponse}}, summary="The model in service"
)
async def get_model(classifier: ClassifierDep, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    versions = [p.stem for p in registry.available()]
    return model_info(classifier, settings.providers, versions)


@router.post(
    "/activate",
    response_model=ModelInfo,
    dependencies=[ApiKey],
    responses={
        400: {"model": ErrorResponse, "description": "a body that is not JSON"},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse, "description": "body over the upload limit"},
        422: {"model": ValidationErrorResponse, "description": "invalid body, or the model cannot be loaded"},
    },
    summary="Serve another model from the weights directory (switch or roll back)",
)
async def activate(body: ActivateRequest, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    try:
        # Loading and warming take about a second: off the event loop, requests keep flowing.
        classifier = await asyncio.to_thread(registry.activate, body.version)
    except ModelNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except Exception as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"model {body.version!r} cannot be loaded: {exc}"
        ) from None
    return model_info(classifier, settings.providers, [p.stem for p in registry.available()])
