import asyncio

from fastapi import APIRouter, HTTPException, status

from alexnet_core.files import WriteError
from alexnet_core.session import OnnxClassifier
from service.core.config import Settings
from service.core.security import ApiKey
from service.database import DatabaseError
from service.deps import ClassifierDep, RegistryDep, SettingsDep
from service.model_registry import ModelNotFound, ModelRegistry, StateReadOnly
from service.schemas import BODY, KEYED, ActivateRequest, ModelInfo, error_responses

router = APIRouter(prefix="/model", tags=["model"])


def model_info(classifier: OnnxClassifier, registry: ModelRegistry, settings: Settings) -> ModelInfo:
    return ModelInfo(
        **classifier.metadata.model_dump(),
        sha256=classifier.sha256,
        file=classifier.path.name,
        integrity="verified" if registry.is_verified(classifier.path) else "unverified",
        providers_requested=settings.providers,
        providers=classifier.providers,
        available_versions=[p.stem for p in registry.available()],
    )


@router.get(
    "", response_model=ModelInfo, responses=error_responses({503: None}), summary="The model in service"
)
async def get_model(classifier: ClassifierDep, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    # Listing reads each file's metadata header (cached per file version): off the event loop.
    return await asyncio.to_thread(model_info, classifier, registry, settings)


@router.post(
    "/activate",
    response_model=ModelInfo,
    dependencies=[ApiKey],
    responses=error_responses(
        BODY
        | KEYED
        | {
            404: None,
            422: "invalid body, or the model cannot be loaded",
            503: "activation disabled (no writable state directory), or the database cannot be reached",
            507: "the ACTIVE file cannot be written (disk full): nothing changed",
        }
    ),
    summary="Serve another model from the weights directory (switch or roll back)",
)
async def activate(body: ActivateRequest, registry: RegistryDep, settings: SettingsDep) -> ModelInfo:
    try:
        # Loading and warming take about a second: off the event loop, requests keep flowing.
        classifier = await asyncio.to_thread(registry.activate, body.version)
    except ModelNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except StateReadOnly as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    except DatabaseError as exc:
        headers = {"Retry-After": str(exc.retry_after_s)}
        raise HTTPException(
            exc.status_code, f"model {body.version!r} not activated: {exc.detail}", headers
        ) from None
    except WriteError as exc:
        raise HTTPException(
            status.HTTP_507_INSUFFICIENT_STORAGE,
            f"model {body.version!r} not activated: {registry.redact_paths(exc)}; "
            "the served model is unchanged",
        ) from None
    except Exception as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"model {body.version!r} cannot be loaded: {registry.redact_paths(exc)}",
        ) from None
    return await asyncio.to_thread(model_info, classifier, registry, settings)
