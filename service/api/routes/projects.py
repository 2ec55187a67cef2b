from fastapi import APIRouter
from sqlalchemy import select

from service.api.auth import AdminCaller, Caller, OperatorCaller, create_key, create_project
from service.api.deps import BlobsDep, DatabaseDep, QueueDep, SessionDep, SettingsDep
from service.api.schemas import (KeyCreate, KeyCreated, KeyOut, ProjectCreate, ProjectCreated, ProjectDeleted,
                                 ProjectOut, ProjectUpdate)
from service.datasets.catalog import get_or_404
from service.errors import Conflict, NotFound
from service.store.db import utcnow
from service.store.projects import delete_project_rows, remove_files
from service.store.tables import DEFAULT_PROJECT_ID, ApiKey, Project

router = APIRouter(tags=["projects and keys"])

PROJECT_DELETE_WAIT_S = 10.0  # for its running jobs to stop (workers check for a cancel every second)


def _project(session, project_id: str, caller: Caller) -> Project:
    """A project the caller may manage: its own, or any for the operator; others answer 404 alike."""
    if not caller.operator and project_id != caller.project_id:
        raise NotFound(f"no project with id {project_id[:80]!r}")
    return get_or_404(session, Project, project_id, "project", None)


def _key_out(key: ApiKey, plaintext: str) -> KeyCreated:
    return KeyCreated.model_validate({**KeyOut.model_validate(key).model_dump(), "key": plaintext})


@router.post("/v1/projects", status_code=201)
def new_project(body: ProjectCreate, caller: OperatorCaller, session: SessionDep) -> ProjectCreated:
    """Operator: create a project, its quotas and its first admin key (shown once)."""
    project = create_project(session, body.name, dict(body.quotas))
    key, plaintext = create_key(session, project.id, "admin", "admin")
    return ProjectCreated(project=ProjectOut.model_validate(project), admin_key=_key_out(key, plaintext))


@router.get("/v1/projects")
def list_projects(caller: AdminCaller, session: SessionDep) -> list[ProjectOut]:
    """Every project for the operator; a project's admin sees only its own."""
    if caller.operator:
        return [ProjectOut.model_validate(p) for p in session.scalars(select(Project).order_by(Project.created_at))]
    return [ProjectOut.model_validate(_project(session, caller.project_id, caller))]


@router.patch("/v1/projects/{project_id}")
def update_project(project_id: str, body: ProjectUpdate, caller: OperatorCaller, session: SessionDep) -> ProjectOut:
    """Operator: change a project's quotas (null restores the server's default); they bind at once."""
    project = _project(session, project_id, caller)
    quotas = {**project.quotas, **body.quotas}
    project.quotas = {name: value for name, value in quotas.items() if value is not None}
    session.flush()
    return ProjectOut.model_validate(project)


@router.delete("/v1/projects/{project_id}")
def delete_project(project_id: str, caller: OperatorCaller, db: DatabaseDep, queue: QueueDep, blobs: BlobsDep,
                   settings: SettingsDep) -> ProjectDeleted:
    """Operator: delete a project and all it owns (its running jobs are cancelled first). Image files
    another project also holds are kept; nothing of another project changes."""
    if project_id == DEFAULT_PROJECT_ID:
        raise Conflict("the default project cannot be deleted: it holds the operator keys and what Graft "
                       "creates while it runs without keys")
    with db.session() as session:
        _project(session, project_id, caller)
        running = queue.cancel_project_jobs(session, project_id)
    if running:
        queue.wait_stopped(project_id, PROJECT_DELETE_WAIT_S)
    with db.session() as session:
        deleted = delete_project_rows(session, _project(session, project_id, caller))
    remove_files(settings, blobs, deleted)
    return ProjectDeleted(id=project_id, deleted=deleted.summary())


@router.post("/v1/projects/{project_id}/keys", status_code=201)
def new_key(project_id: str, body: KeyCreate, caller: AdminCaller, session: SessionDep) -> KeyCreated:
    """A new API key for this project; the key itself is in this answer only."""
    project = _project(session, project_id, caller)
    key, plaintext = create_key(session, project.id, body.name, body.scope, aliases=body.aliases)
    return _key_out(key, plaintext)


@router.get("/v1/projects/{project_id}/keys")
def list_keys(project_id: str, caller: AdminCaller, session: SessionDep) -> list[KeyOut]:
    """The project's keys: names, prefixes, scopes, last use; never the keys themselves (nor, to a
    project's admin, the operator keys that live in the default project)."""
    project = _project(session, project_id, caller)
    query = select(ApiKey).where(ApiKey.project_id == project.id)
    if not caller.operator:
        query = query.where(ApiKey.operator.is_(False))
    return [KeyOut.model_validate(k) for k in session.scalars(query.order_by(ApiKey.created_at))]


@router.delete("/v1/keys/{key_id}")
def revoke_key(key_id: str, caller: AdminCaller, session: SessionDep) -> KeyOut:
    """Revoke a key at once (the operator: any key; an admin: its project's); requests with it then get 401,
    and its open event streams close."""
    key = get_or_404(session, ApiKey, key_id, "API key", None if caller.operator else caller.project_id)
    if key.operator and not caller.operator:  # the default project's admin does not manage the server's
        raise NotFound(f"no API key with id {key_id!r}")
    key.revoked_at = key.revoked_at or utcnow()
    return KeyOut.model_validate(key)
