from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.catalog import get_or_404
from service.deps import SessionDep, SettingsDep
from service.errors import Conflict
from service.queue import TERMINAL, JobQueue
from service.schemas import JobCreate, JobOut, JobStatus
from service.tables import Dataset, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a training job; the recipe's defaults are filled in and stored on the job."""
    get_or_404(session, Dataset, body.dataset_id, "dataset")
    config = body.model_dump(exclude={"dataset_id", "priority"})
    job = JobQueue.enqueue(session, dataset_id=body.dataset_id, config=config,
                           max_attempts=settings.max_attempts, priority=body.priority)
    return JobOut.of(job)


@router.get("")
def list_jobs(session: SessionDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              offset: Annotated[int, Query(ge=0)] = 0) -> list[JobOut]:
    """Jobs, newest first, optionally of one status."""
    query = select(Job).order_by(Job.created_at.desc()).limit(limit).offset(offset)
    if status:
        query = query.where(Job.status == status)
    return [JobOut.of(j) for j in session.scalars(query)]


@router.get("/{job_id}")
def get_job(job_id: str, session: SessionDep) -> JobOut:
    return JobOut.of(get_or_404(session, Job, job_id, "job"))


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, session: SessionDep) -> JobOut:
    """Cancel a queued job at once, or stop a running one at its next training step."""
    job = get_or_404(session, Job, job_id, "job")
    if job.status in TERMINAL:
        raise Conflict(f"job {job_id} has already {job.status}; only queued or running jobs can be cancelled")
    JobQueue.request_cancel(session, job)
    session.flush()
    return JobOut.of(job)
