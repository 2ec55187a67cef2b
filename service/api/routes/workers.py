from fastapi import APIRouter

from service.api.auth import AdminCaller
from service.api.deps import QueueDep, SessionDep
from service.api.schemas import WorkerOut

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("")
def list_workers(queue: QueueDep, caller: AdminCaller, session: SessionDep) -> list[WorkerOut]:
    """Live workers (heartbeat within the stale window): host, device, current job.

    Workers are shared by every project; to a project's admin a job of another project shows as
    null, the operator sees every job."""
    workers = queue.live_workers(session)
    busy = {w.current_job_id for w in workers if w.current_job_id}
    own = busy if caller.operator else queue.of_project(session, busy, caller.project_id)
    return [WorkerOut.model_validate(w).model_copy(update={"current_job_id": w.current_job_id
                                                            if w.current_job_id in own else None})
            for w in workers]
