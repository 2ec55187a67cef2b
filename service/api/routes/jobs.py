import json
import time
from typing import Annotated, Iterator

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from service.api import quotas
from service.api.auth import Caller, TrainCaller, still_valid
from service.datasets.catalog import dataset_for_job, job_or_404
from service.datasets.lineage import with_base_model
from service.store.db import Database
from service.api.deps import DatabaseDep, SessionDep, SettingsDep
from service.errors import Conflict
from service.enums import TERMINAL, JobStatus
from service.store.queue import JobQueue
from service.api.schemas import JobCreate, JobEventOut, JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202)
def create_job(body: JobCreate, caller: TrainCaller, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Queue a training job; the recipe's defaults are filled in and stored on the job."""
    dataset_for_job(session, body.dataset_id, caller.project_id)  # 422 when it cannot train; freezes it
    body = with_base_model(session, body, caller.project_id)  # 404/409/422 for a base model it cannot use
    quotas.check_new_job(session, settings, caller.project_id)
    config = body.model_dump(exclude={"dataset_id", "priority", "device"})
    job = JobQueue.enqueue(session, project_id=caller.project_id, dataset_id=body.dataset_id, config=config,
                           max_attempts=settings.max_attempts, priority=body.priority,
                           requires_gpu=body.device == "gpu")
    return JobOut.of(job)


@router.get("")
def list_jobs(caller: TrainCaller, session: SessionDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> list[JobOut]:
    """Jobs, newest first, optionally of one status."""
    return [JobOut.of(j) for j in JobQueue.list_jobs(session, caller.project_id, status=status, limit=limit,
                                                     offset=offset)]


@router.get("/{job_id}")
def get_job(job_id: str, caller: TrainCaller, session: SessionDep) -> JobOut:
    return JobOut.of(job_or_404(session, job_id, caller.project_id))


@router.post("/{job_id}/cancel", status_code=202)
def cancel_job(job_id: str, caller: TrainCaller, session: SessionDep) -> JobOut:
    """Cancel a queued job at once, or stop a running one at its next training step."""
    job = job_or_404(session, job_id, caller.project_id)
    if job.status in TERMINAL:
        raise Conflict(f"job {job_id} has already {job.status}; only queued or running jobs can be cancelled")
    JobQueue.request_cancel(session, job)
    session.flush()
    return JobOut.of(job)


SSE_POLL_S = 0.5
SSE_KEEPALIVE_S = 15.0
SSE_MAX_S = 3600.0  # then the client reconnects with Last-Event-ID


@router.get("/{job_id}/events", response_model=list[JobEventOut],
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, db: DatabaseDep, caller: TrainCaller,
               after_id: Annotated[int, Query(ge=0, description="only events after this one (its id: the "
                                                           "event's number within the job)")] = 0,
               accept: Annotated[str, Header()] = "application/json",
               last_event_id: Annotated[int | None, Header(ge=0)] = None):
    """The job's event log (state changes, per-epoch metrics, warnings), oldest first.

    With `Accept: text/event-stream` it is a Server-Sent Events stream that follows the job live
    and closes once the job has ended and every event was sent, or within a second of its key being
    revoked (or its project deleted).
    """
    # Short transactions of its own, not the request's session: that one would stay open for the
    # whole stream and, on SQLite, hold the write lock.
    with db.session() as session:
        job_or_404(session, job_id, caller.project_id)
        if "text/event-stream" not in accept:
            return [JobEventOut.model_validate(e) for e in JobQueue.events(session, job_id, after_id)]
    start = last_event_id if last_event_id is not None else after_id
    return StreamingResponse(_event_stream(db, job_id, start, caller), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event_stream(db: Database, job_id: str, after_id: int, caller: Caller) -> Iterator[str]:
    started = last_sent = time.monotonic()
    while time.monotonic() - started < SSE_MAX_S:
        with db.session() as s:
            if not still_valid(s, caller):  # the key was revoked meanwhile: its stream ends with it
                return
            events = [JobEventOut.model_validate(e) for e in JobQueue.events(s, job_id, after_id)]
            status = JobQueue.status_of(s, job_id)
        for e in events:
            after_id = e.id
            yield f"id: {e.id}\nevent: {e.kind}\ndata: {json.dumps({**e.data, 'created_at': e.created_at.isoformat()})}\n\n"
            last_sent = time.monotonic()
        if status in TERMINAL and not events:
            return
        if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        time.sleep(SSE_POLL_S)
