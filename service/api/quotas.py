"""Per-project quotas: Settings holds the defaults, a project's `quotas` overrides them."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.errors import Forbidden, TooManyRequests
from service.settings import Settings
from service.store.queue import JobQueue
from service.store.tables import Dataset, DatasetImage, Project

def quota(session: Session, settings: Settings, project_id: str, name: str) -> int:
    project = session.get(Project, project_id)
    overrides = project.quotas if project is not None else {}
    return int(overrides.get(name, getattr(settings, name)))


def check_new_job(session: Session, settings: Settings, project_id: str) -> None:
    limit = quota(session, settings, project_id, "max_concurrent_jobs")
    active = JobQueue.active_count(session, project_id)
    if limit and active >= limit:
        raise TooManyRequests(f"this project already has {active} queued or running jobs, its limit; "
                              "retry when one has finished, or cancel one", headers={"Retry-After": "30"})


def check_new_dataset(session: Session, settings: Settings, project_id: str) -> None:
    limit = quota(session, settings, project_id, "max_datasets")
    count = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.project_id == project_id))
    if limit and count >= limit:
        raise Forbidden(f"this project has {count} datasets, its limit of {limit}; ask an admin to raise "
                        "the project's max_datasets quota")


def stored_bytes(session: Session, project_id: str) -> int:
    """Bytes of the distinct images the project's datasets hold (versions share their images)."""
    distinct = (select(DatasetImage.sha256, DatasetImage.size_bytes).join(Dataset, Dataset.id == DatasetImage.dataset_id)
                .where(Dataset.project_id == project_id).distinct().subquery())
    return int(session.scalar(select(func.coalesce(func.sum(distinct.c.size_bytes), 0))))


def check_storage(session: Session, settings: Settings, project_id: str, adding: int) -> None:
    """Before new images are kept: refuse what would take the project past its storage quota."""
    limit = quota(session, settings, project_id, "max_stored_bytes")
    used = stored_bytes(session, project_id) if limit else 0
    if limit and used + adding > limit:
        raise Forbidden(f"this upload adds {adding} bytes to the {used} this project stores; its quota is "
                        f"{limit} bytes. Remove datasets or images, or ask an admin to raise max_stored_bytes")
