from fastapi import APIRouter
from sqlalchemy import text

from service.api.auth import auth_is_open
from service.api.deps import SessionDep, SettingsDep

router = APIRouter(tags=["health"])

OPEN_WARNING = ("Graft is running WITHOUT API keys: anyone who can reach this address can use it. "
                "Create a key with `graft keys create --project NAME --scope admin` and set GRAFT_AUTH_REQUIRED=1.")


@router.get("/healthz")
def healthz(session: SessionDep, settings: SettingsDep) -> dict:
    """Liveness and database reachability; says so when the API runs without keys."""
    session.execute(text("SELECT 1"))
    if auth_is_open(settings):
        return {"status": "ok", "auth": "open", "warning": OPEN_WARNING}
    return {"status": "ok", "auth": "required"}
