from fastapi import APIRouter
from sqlalchemy import select

from service.api.auth import AdminCaller, create_key, create_project
from service.datasets.catalog import get_or_404
from service.store.db import utcnow
from service.api.deps import SessionDep
from service.errors import NotFound
from service.api.schemas import KeyCreate, KeyCreated, KeyOut, ProjectCreate, ProjectCreated, ProjectOut
from service.store.tables import ApiKey, Project

router = APIRouter(tags=["projects and keys"])


def _own_project(session, project_id: str, caller) -> Project:
    project = session.get(Project, project_id) if project_id == caller.project_id else None
    if project is None:
        raise NotFound(f"no project with id {project_id!r}")
    return project


@router.post("/v1/projects", status_code=201)
def new_project(body: ProjectCreate, caller: AdminCaller, session: SessionDep) -> ProjectCreated:
    """Create a project and its first admin key (shown once). Nothing of it is visible to other projects."""
    project = create_project(session, body.name, dict(body.quotas))
    key, plaintext = create_key(session, project.id, "admin", "admin")
    return ProjectCreated(project=ProjectOut.model_validate(project),
                          admin_key=KeyCreated.model_validate({**KeyOut.model_validate(key).model_dump(),
                                                               "key": plaintext}))


@router.get("/v1/projects")
def list_projects(caller: AdminCaller, session: SessionDep) -> list[ProjectOut]:
    """The caller's own project (a key never sees another)."""
    return [ProjectOut.model_validate(_own_project(session, caller.project_id, caller))]


@router.post("/v1/projects/{project_id}/keys", status_code=201)
def new_key(project_id: str, body: KeyCreate, caller: AdminCaller, session: SessionDep) -> KeyCreated:
    """A new API key for this project; the key itself is in this answer only."""
    project = _own_project(session, project_id, caller)
    key, plaintext = create_key(session, project.id, body.name, body.scope)
    return KeyCreated.model_validate({**KeyOut.model_validate(key).model_dump(), "key": plaintext})


@router.get("/v1/projects/{project_id}/keys")
def list_keys(project_id: str, caller: AdminCaller, session: SessionDep) -> list[KeyOut]:
    """The project's keys: names, prefixes, scopes, last use; never the keys themselves."""
    project = _own_project(session, project_id, caller)
    return [KeyOut.model_validate(k) for k in
            session.scalars(select(ApiKey).where(ApiKey.project_id == project.id).order_by(ApiKey.created_at))]


@router.delete("/v1/keys/{key_id}")
def revoke_key(key_id: str, caller: AdminCaller, session: SessionDep) -> KeyOut:
    """Revoke a key of the caller's project at once; requests with it then get 401."""
    key = get_or_404(session, ApiKey, key_id, "API key", caller.project_id)
    key.revoked_at = key.revoked_at or utcnow()
    return KeyOut.model_validate(key)
