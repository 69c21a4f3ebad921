"""POST /model/ensemble: build an ensemble of models in the weights directory as a new version
(model_export.ensemble, onnx only: no torch), optionally activating it."""

import asyncio
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import onnx
from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from alexnet_core import model_files
from alexnet_core.files import WriteError
from model_export.ensemble import MAX_MEMBERS, EnsembleError, build_ensemble
from service.core.security import ApiKey
from service.database import DatabaseError
from service.deps import RegistryDep, SettingsDep
from service.model_registry import ModelNotFound, ModelRegistry
from service.schemas import BODY, KEYED, error_responses

router = APIRouter(prefix="/model", tags=["model"])
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_building = threading.Lock()  # one build at a time: each holds several models in memory


class EnsembleRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"members": ["digits-s0", "digits-s1", "digits-s2"]}]}
    )
    members: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] = Field(
        min_length=2,
        max_length=MAX_MEMBERS,
        description="model versions (file stems) in the weights directory",
    )
    version: str | None = Field(
        None, pattern=VERSION_PATTERN, description="the new version's name (default: ensemble-<time>)"
    )
    activate: bool = Field(False, description="serve the ensemble once it is built")


class EnsembleResponse(BaseModel):
    version: str
    file: str
    members: list[str]
    activated: bool = Field(description="in service now (else: POST /model/activate to serve it)")
    available_versions: list[str]


def _ensemble_name(requested: str | None) -> str:
    return requested or f"ensemble-{datetime.now(UTC):%Y%m%d-%H%M%S-%f}"


async def _activate_or_remove(registry: ModelRegistry, version: str, output: Path) -> None:
    """Serve the new ensemble, or remove it and answer 422: a refused request leaves no file
    behind, as when the build itself fails."""
    try:
        await asyncio.to_thread(registry.activate, version)
    except Exception as exc:
        output.unlink(missing_ok=True)
        model_files.manifest_path(output).unlink(missing_ok=True)
        if isinstance(exc, DatabaseError):  # the activation cannot be recorded now: retry
            raise HTTPException(503, exc.detail, {"Retry-After": str(exc.retry_after_s)}) from None
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"the ensemble {version!r} cannot be served, so it was not kept: {registry.redact_paths(exc)}",
        ) from None


@router.post(
    "/ensemble",
    status_code=status.HTTP_201_CREATED,
    response_model=EnsembleResponse,
    dependencies=[ApiKey],
    responses=error_responses(
        BODY
        | KEYED
        | {
            404: "a member is not in the weights directory",
            409: "the version exists, or another build is running",
            422: "a bad body, members that do not fit together, or an ensemble that cannot be served",
        }
    ),
    summary="Build the average of several models' softmax outputs as one model version (key required)",
)
async def ensemble(body: EnsembleRequest, registry: RegistryDep, settings: SettingsDep) -> EnsembleResponse:
    try:
        paths = [registry.find(member) for member in body.members]
    except ModelNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    version = _ensemble_name(body.version)
    assert re.match(VERSION_PATTERN, version)  # a plain file name: never a path from the client
    output = settings.weights_dir / f"{version}.onnx"
    if output.exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"model {version!r} exists: choose another version")
    if not _building.acquire(blocking=False):
        raise HTTPException(
            status.HTTP_409_CONFLICT, "another ensemble is being built: try again when it is done"
        )
    try:
        # Reading, merging and checking several 200+ MB graphs: off the event loop.
        await asyncio.to_thread(build_ensemble, paths, output, version)
    except EnsembleError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, registry.redact_paths(exc)) from None
    except (WriteError, onnx.checker.ValidationError) as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"cannot build the ensemble: {registry.redact_paths(exc)}"
        ) from None
    finally:
        _building.release()
    if body.activate:
        await _activate_or_remove(registry, version, output)
    return EnsembleResponse(
        version=version,
        file=output.name,
        members=body.members,
        activated=body.activate,
        available_versions=[p.stem for p in registry.available()],
    )
