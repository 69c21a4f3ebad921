import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, Response, status
from fastapi.responses import FileResponse

from alexnet_core.training import CURVES, EpochEvent, Event, StepEvent, job_progress, read_events
from service.core.security import ApiKey
from service.schemas import BODY, KEYED, TrainingJob, TrainingMetrics, TrainRequest, error_responses
from service.training_jobs import JobRecord, TrainingManager

router = APIRouter(prefix="/train", tags=["train"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="job id")]
# The app's validation handler answers {"detail": str, "errors": [...]}; without this FastAPI
# documents its own default shape ({"detail": [...]}) for every route with a parameter.
NOT_FOUND = error_responses({404: None, 422: None})
# The routes of one job (included at the end): each answers 404 for an unknown id.
job_routes = APIRouter(prefix="/{job_id}", responses=NOT_FOUND)
AUTH_ERRORS = error_responses({**KEYED, 404: None, 409: None, 422: None})
# What starting, cancelling and resuming a job share: 202, the job's view, the API key.
JOB_ACTION: dict[str, Any] = {
    "status_code": status.HTTP_202_ACCEPTED,
    "response_model": TrainingJob,
    "dependencies": [ApiKey],
}


async def get_manager(request: Request) -> TrainingManager:
    manager = request.app.state.training
    if manager is None:  # no writable place for job records and runs
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"training is disabled: {request.app.state.read_only}"
        )
    return manager


ManagerDep = Annotated[TrainingManager, Depends(get_manager)]


async def find_job(job_id: JobId, manager: ManagerDep) -> JobRecord:
    """The job the path names (404 when there is none)."""
    return manager.get(job_id)


JobDep = Annotated[JobRecord, Depends(find_job)]


def job_view(job: JobRecord, events: list[Event]) -> TrainingJob:
    """The API's view of a job: its record, and its progress from the trainer's events."""
    url = f"/train/{job.id}"
    curves = (job.run_dir / CURVES).is_file()
    return TrainingJob.model_validate(
        vars(job)
        | job_progress(events, job.state).model_dump()
        | {"url": url, "epochs": job.request.epochs, "curves_url": f"{url}/{CURVES}" if curves else None}
    )


async def view(job: JobRecord) -> TrainingJob:
    return job_view(job, await asyncio.to_thread(read_events, job.run_dir))


@router.post(
    "",
    **JOB_ACTION,
    responses=AUTH_ERRORS
    | error_responses(
        {
            400: "dataset refused or not found; body not JSON",
            413: BODY[413],
            501: None,
            503: "training disabled (read-only state or weights), or the job database locked (Retry-After)",
            507: "no room on disk to record the job",
        }
    ),
    summary="Start a training job (one at a time; 409 while one runs)",
)
async def start_training(body: TrainRequest, manager: ManagerDep, response: Response) -> TrainingJob:
    job = await manager.submit(body)
    response.headers["Location"] = f"/train/{job.id}"
    return await view(job)


@router.get("", response_model=list[TrainingJob], summary="All training jobs, newest first")
async def list_jobs(manager: ManagerDep) -> list[TrainingJob]:
    jobs = await asyncio.to_thread(manager.all)
    return [await view(job) for job in jobs]


@job_routes.get("", response_model=TrainingJob, summary="State and progress of a job")
async def get_job(job: JobDep) -> TrainingJob:
    return await view(job)


@job_routes.get("/metrics", response_model=TrainingMetrics, summary="Loss and accuracy history of a job")
async def job_metrics(job: JobDep) -> TrainingMetrics:
    events = await asyncio.to_thread(read_events, job.run_dir)

    def fields(event: EpochEvent | StepEvent) -> dict[str, float | int | None]:
        return event.model_dump(exclude={"event"})

    return TrainingMetrics(
        id=job.id,
        epochs=[fields(e) for e in events if isinstance(e, EpochEvent)],
        steps=[fields(e) for e in events if isinstance(e, StepEvent)],
    )


@job_routes.get("/curves.png", response_class=FileResponse, summary="Loss and accuracy curves (PNG)")
async def job_curves(job: JobDep) -> FileResponse:
    path = job.run_dir / CURVES
    if not path.is_file():
        raise HTTPException(404, f"job {job.id} has no curves yet (written after its first epoch)")
    return FileResponse(path, media_type="image/png")


@job_routes.delete(
    "",
    **JOB_ACTION,
    responses=AUTH_ERRORS,
    summary="Cancel a running job (stops within one batch, keeps its last checkpoint)",
)
async def cancel_job(job_id: JobId, manager: ManagerDep) -> TrainingJob:
    return await view(manager.cancel(job_id))


@job_routes.post(
    "/resume",
    **JOB_ACTION,
    responses=AUTH_ERRORS | error_responses({400: "its dataset is no longer under the data root", 501: None}),
    summary="Resume a stopped job from its last checkpoint",
)
async def resume_job(job_id: JobId, manager: ManagerDep) -> TrainingJob:
    return await view(await manager.resume(job_id))


router.include_router(job_routes)
