from fastapi import APIRouter
from sqlalchemy import text

from service.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(session: SessionDep) -> dict:
    """Liveness and database reachability."""
    session.execute(text("SELECT 1"))
    return {"status": "ok"}
