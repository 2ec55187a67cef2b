from fastapi import APIRouter, Request
from sqlalchemy import select

from service.api.auth import AdminCaller
from service.api.deps import SessionDep
from service.api.schemas import WorkerOut
from service.store.tables import Job

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("")
def list_workers(request: Request, caller: AdminCaller, session: SessionDep) -> list[WorkerOut]:
    """Live workers (heartbeat within the stale window): host, device, current job.

    Workers are shared by every project; a job of another project shows as null."""
    workers = request.app.state.queue.live_workers(session)
    running = {w.current_job_id for w in workers if w.current_job_id}
    own = set(session.scalars(select(Job.id).where(Job.id.in_(running), Job.project_id == caller.project_id)))
    return [WorkerOut.model_validate(w).model_copy(update={"current_job_id": w.current_job_id
                                                            if w.current_job_id in own else None})
            for w in workers]
