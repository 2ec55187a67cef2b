"""Deleting a project: everything it owns goes, and nothing another project uses is touched.

Rows go in one transaction (`delete_project_rows`); the files they pointed at are removed only
after it committed (`remove_files`), so a failed delete never leaves rows whose files are gone.
Image blobs are shared by content across projects: only those no other project's dataset holds
are removed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.errors import Conflict
from service.settings import Settings
from service.store.blobs import BlobStore
from service.store.objects import LocalObjects, StorageUnavailable, store_for
from service.store.queue import JobQueue
from service.store.db import Base
from service.store.tables import ApiKey, Dataset, DatasetImage, Job, Model, Project
from workers.checkpoints import checkpoint_dir

log = logging.getLogger("graft.store")


@dataclass
class Deleted:
    """What a project's deletion removed (the counts are the answer to DELETE /v1/projects/{id})."""

    datasets: int = 0
    images: int = 0
    models: int = 0
    jobs: int = 0
    keys: int = 0
    blobs: list[str] = field(default_factory=list)  # sha256s no other project uses
    model_dirs: list[str] = field(default_factory=list)  # relative to the data dir
    model_ids: list[str] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"datasets": self.datasets, "images": self.images, "models": self.models, "jobs": self.jobs,
                "keys": self.keys, "blobs": len(self.blobs)}


def delete_project_rows(session: Session, project: Project) -> Deleted:
    """Every row of the project, in one transaction; refused while one of its jobs still runs."""
    running = JobQueue.running_of_project(session, project.id)
    if running:
        raise Conflict(f"{len(running)} job(s) of this project are still stopping; retry in a few seconds",
                       headers={"Retry-After": "5"})
    out = Deleted()
    datasets = select(Dataset.id).where(Dataset.project_id == project.id)
    own_blobs = set(session.scalars(select(DatasetImage.sha256).where(DatasetImage.dataset_id.in_(datasets))))
    used_elsewhere = set(session.scalars(
        select(DatasetImage.sha256).join(Dataset, Dataset.id == DatasetImage.dataset_id)
        .where(Dataset.project_id != project.id, DatasetImage.sha256.in_(own_blobs)))) if own_blobs else set()
    out.blobs = sorted(own_blobs - used_elsewhere)
    _delete_other_owned_rows(session, project.id)
    for model in session.scalars(select(Model).where(Model.project_id == project.id)):
        out.model_ids.append(model.id)
        out.model_dirs.append(model.artifact_dir)
    out.models = session.execute(delete(Model).where(Model.project_id == project.id)).rowcount
    out.job_ids = JobQueue.delete_project_jobs(session, project.id)
    out.jobs = len(out.job_ids)
    out.images = session.scalar(select(func.count()).select_from(DatasetImage)
                                .where(DatasetImage.dataset_id.in_(datasets)))
    session.execute(delete(DatasetImage).where(DatasetImage.dataset_id.in_(datasets)))
    out.datasets = session.execute(delete(Dataset).where(Dataset.project_id == project.id)).rowcount
    out.keys = session.execute(delete(ApiKey).where(ApiKey.project_id == project.id)).rowcount
    session.delete(project)
    return out


EXPLICIT = {t.__table__.name for t in (Dataset, Job, Model, ApiKey)}  # deleted above, with what hangs on them


def _delete_other_owned_rows(session: Session, project_id: str) -> None:
    """Rows of every other table with a project_id (aliases, webhooks, ...), those that point at
    others first; rows that only hang on them by a foreign key go by its ON DELETE CASCADE."""
    for table in reversed(Base.metadata.sorted_tables):
        if "project_id" in table.c and table.name not in EXPLICIT:
            session.execute(delete(table).where(table.c.project_id == project_id))


def remove_files(settings: Settings, blobs: BlobStore, deleted: Deleted) -> None:
    """The deleted project's files: unshared blobs, model artifacts, their exports, checkpoints, batch
    results. The rows are gone already, so an object store that cannot be reached now only leaves
    files nobody can reach (logged), never a failed request."""
    storage = store_for(settings)
    try:
        for sha in deleted.blobs:
            blobs.delete(sha)
        for relative in deleted.model_dirs:
            _remove_tree(storage, settings, relative, settings.models_dir)
        exports = storage.keys(settings.relative_to_data(settings.exports_dir)) if deleted.model_ids else []
        for model_id in deleted.model_ids:
            for key in exports:
                if Path(key).name.startswith(f"{model_id}-"):
                    storage.delete(key)
        for job_id in deleted.job_ids:
            _remove_tree(storage, settings, settings.relative_to_data(checkpoint_dir(settings, job_id)),
                         settings.checkpoints_dir)
            _remove_tree(storage, settings, settings.relative_to_data(settings.batch_results_dir / job_id),
                         settings.batch_results_dir)  # batch predictions' results
    except StorageUnavailable as exc:
        log.warning("files of a deleted project were left in the object store: %s", exc.detail,
                    extra={"action": "project_files_left"})


def _remove_tree(storage: LocalObjects, settings: Settings, relative: str, inside: Path) -> None:
    # A path read from the database is removed only where Graft keeps such files.
    path = settings.data_path(relative)
    if path.resolve().is_relative_to(inside.resolve()) and path.resolve() != inside.resolve():
        storage.delete_prefix(relative)
