import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response, status
from fastapi.responses import FileResponse

from service.core.security import ApiKey
from service.schemas import (
    ErrorResponse,
    JobState,
    TrainingJob,
    TrainingMetrics,
    TrainRequest,
    ValidationErrorResponse,
)
from service.training_jobs import JobRecord, TrainingManager, read_metrics

router = APIRouter(prefix="/train", tags=["train"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="job id")]
# The app's validation handler answers {"detail": str, "errors": [...]}; without this FastAPI
# documents its own default shape ({"detail": [...]}) for every route with a parameter.
INVALID: dict[int | str, dict[str, Any]] = {422: {"model": ValidationErrorResponse}}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
    **INVALID,
}


async def get_manager(request: Request) -> TrainingManager:
    return request.app.state.training


ManagerDep = Annotated[TrainingManager, Depends(get_manager)]


def _time(value: float | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def job_view(job: JobRecord, records: list[dict[str, Any]]) -> TrainingJob:
    def last(event: str) -> dict[str, Any]:
        return next((r for r in reversed(records) if r.get("event") == event), {})

    start, step, epoch, done = last("start"), last("step"), last("epoch"), last("done")
    total = start.get("total_steps")
    current = step.get("step", epoch.get("step"))
    progress = min(1.0, current / total) if current and total else 0.0
    if job.state == JobState.succeeded:
        progress = 1.0
    eta = None
    if job.state == JobState.running and progress > 0 and start.get("time") and step.get("time"):
        done_steps = current - start.get("start_epoch", 0) * start.get("steps_per_epoch", 0)
        elapsed = step["time"] - start["time"]
        if done_steps > 0 and elapsed > 0:
            eta = (total - current) * elapsed / done_steps
    url = f"/train/{job.id}"
    return TrainingJob(
        id=job.id,
        state=job.state,
        url=url,
        created_at=_time(job.created_at),
        started_at=_time(job.started_at),
        finished_at=_time(job.finished_at),
        request=job.request,
        epoch=epoch.get("epoch"),
        epochs=job.request.epochs,
        step=current,
        total_steps=total,
        progress=progress,
        eta_s=eta,
        loss=step.get("loss"),
        val_top1=epoch.get("val_top1"),
        val_top5=epoch.get("val_top5"),
        val10_top1=done.get("val10_top1"),
        error=job.error,
        model_version=job.model_version,
        activated=job.activated,
        curves_url=f"{url}/curves.png" if (job.run_dir / "curves.png").is_file() else None,
    )


async def view(job: JobRecord) -> TrainingJob:
    return job_view(job, await asyncio.to_thread(read_metrics, job.run_dir))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingJob,
    dependencies=[ApiKey],
    responses={
        **AUTH_ERRORS,
        400: {"model": ErrorResponse, "description": "dataset refused or not found; body not JSON"},
        413: {"model": ErrorResponse, "description": "body over the upload limit"},
        501: {"model": ErrorResponse},
    },
    summary="Start a training job (one at a time; 409 while one runs)",
)
async def start_training(body: TrainRequest, manager: ManagerDep, response: Response) -> TrainingJob:
    job = manager.submit(body)
    response.headers["Location"] = f"/train/{job.id}"
    return await view(job)


@router.get("", response_model=list[TrainingJob], summary="All training jobs, newest first")
async def list_jobs(manager: ManagerDep) -> list[TrainingJob]:
    jobs = await asyncio.to_thread(manager.store.all)
    return [await view(job) for job in jobs]


@router.get(
    "/{job_id}",
    response_model=TrainingJob,
    responses={404: {"model": ErrorResponse}, **INVALID},
    summary="State and progress of a job",
)
async def get_job(job_id: JobId, manager: ManagerDep) -> TrainingJob:
    return await view(manager.get(job_id))


@router.get(
    "/{job_id}/metrics",
    response_model=TrainingMetrics,
    responses={404: {"model": ErrorResponse}, **INVALID},
    summary="Loss and accuracy history of a job",
)
async def job_metrics(job_id: JobId, manager: ManagerDep) -> TrainingMetrics:
    job = manager.get(job_id)
    records = await asyncio.to_thread(read_metrics, job.run_dir)

    def fields(r: dict[str, Any]) -> dict[str, float | int | None]:
        return {k: v for k, v in r.items() if isinstance(v, int | float) or v is None}

    return TrainingMetrics(
        id=job.id,
        epochs=[fields(r) for r in records if r.get("event") == "epoch"],
        steps=[fields(r) for r in records if r.get("event") == "step"],
    )


@router.get(
    "/{job_id}/curves.png",
    response_class=FileResponse,
    responses={404: {"model": ErrorResponse}, **INVALID},
    summary="Loss and accuracy curves (PNG)",
)
async def job_curves(job_id: JobId, manager: ManagerDep) -> FileResponse:
    job = manager.get(job_id)
    path = job.run_dir / "curves.png"
    if not path.is_file():
        raise HTTPException(404, f"job {job_id} has no curves yet (written after its first epoch)")
    return FileResponse(path, media_type="image/png")


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingJob,
    dependencies=[ApiKey],
    responses=AUTH_ERRORS,
    summary="Cancel a running job (stops within one batch, keeps its last checkpoint)",
)
async def cancel_job(job_id: JobId, manager: ManagerDep) -> TrainingJob:
    return await view(manager.cancel(job_id))


@router.post(
    "/{job_id}/resume",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TrainingJob,
    dependencies=[ApiKey],
    responses={
        **AUTH_ERRORS,
        400: {"model": ErrorResponse, "description": "its dataset is no longer under the data root"},
        501: {"model": ErrorResponse},
    },
    summary="Resume a stopped job from its last checkpoint",
)
async def resume_job(job_id: JobId, manager: ManagerDep) -> TrainingJob:
    return await view(manager.resume(job_id))
