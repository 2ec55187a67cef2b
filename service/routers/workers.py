from fastapi import APIRouter, Request

from service.deps import SessionDep
from service.schemas import WorkerOut

router = APIRouter(prefix="/v1/workers", tags=["workers"])


@router.get("")
def list_workers(request: Request, session: SessionDep) -> list[WorkerOut]:
    """Live workers (heartbeat within the stale window): host, device, current job."""
    return [WorkerOut.model_validate(w) for w in request.app.state.queue.live_workers(session)]
