"""Datasets, jobs and models as the API reads and writes them (lookups raise NotFound).

Versions: a dataset row a job has used is frozen and never changes again. Adding or removing
images on a frozen dataset creates the next version as a new row (its own id, `version` + 1,
`previous_version_id`), so every job and model keeps pointing at exactly the images it used;
an unfrozen dataset is changed in place. History is linear: once a version has a successor,
changes go to the newest one (409 otherwise). Rows are locked (FOR UPDATE on PostgreSQL; SQLite
takes the database lock) so a change and a job's freeze cannot interleave.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import BinaryIO, Iterable, Iterator

from sqlalchemy import delete, func, insert, literal, select, update
from sqlalchemy.orm import Session

from service.store.blobs import Staging
from service.errors import Conflict, InvalidInput, NotFound
from service.datasets.ingest import UNLABELED, IngestedImage, IngestResult, Intake, check_labels, ingest_files
from service.datasets.multilabel import MULTI_LABEL, MULTI_LABEL_ROW, SINGLE_LABEL
from service.datasets.names import LabelRejected, clean_label
from service.datasets.report import build_report
from service.enums import TERMINAL
from service.settings import Settings
from service.store.queue import JobQueue
from service.store.tables import Dataset, DatasetImage, Job, Model
from workers.artifacts import ArtifactCorrupt, BackboneMismatch
from workers.backbone_registry import RegistryError
from workers.backbones import UnknownBackbone, WeightsUnavailable
from workers.data import DatasetImages, LabeledImage

MAX_LISTED_IN_ERRORS = 1000
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")
_COPIED_COLUMNS = ("sha256", "label", "split", "original_name", "width", "height", "mode", "format", "phash",
                   "size_bytes", "labels")


def _check_id(id_: object, what: str) -> None:
    # Ids are 32 hex digits; anything PostgreSQL cannot even compare (NUL) or absurdly long is
    # simply not found, instead of a driver error.
    if not isinstance(id_, str) or "\x00" in id_ or len(id_) > 200:
        raise NotFound(f"no {what} with id {str(id_)[:80]!r}")


def get_or_404(session: Session, table, id_: str, what: str, project_id: str | None):
    """The row, if it exists and belongs to the caller's project (None: the operator, any project):
    another project's ids are answered exactly like ids that do not exist."""
    _check_id(id_, what)
    obj = session.get(table, id_)
    if obj is None or (project_id is not None and obj.project_id != project_id):
        raise NotFound(f"no {what} with id {id_!r}")
    return obj


def ready_model(session: Session, model_id: str, project_id: str) -> Model:
    """A model of the caller's project; a job id works too once the job has succeeded (409 before)."""
    _check_id(model_id, "model")
    model = session.get(Model, model_id)
    if model is not None and model.project_id == project_id:
        return model
    job = JobQueue.get(session, model_id)
    if job is None or job.project_id != project_id:
        raise NotFound(f"no model with id {model_id!r}")
    if job.model_id:
        return get_or_404(session, Model, job.model_id, "model", project_id)
    raise Conflict(f"{model_id!r} is a job that is {job.status}; its model is not ready"
                   + (" and never will be" if job.status in TERMINAL else ""),
                   job_status=job.status)


def job_or_404(session: Session, job_id: str, project_id: str) -> Job:
    """The job, if it exists and belongs to the caller's project (asked of the queue, which owns jobs)."""
    _check_id(job_id, "job")
    job = JobQueue.get(session, job_id)
    if job is None or job.project_id != project_id:
        raise NotFound(f"no job with id {job_id!r}")
    return job


def list_rows(session: Session, table, project_id: str, limit: int, offset: int) -> list:
    return list(session.scalars(select(table).where(table.project_id == project_id)
                                .order_by(table.created_at.desc()).limit(limit).offset(offset)))


# -- creating and changing datasets ---------------------------------------------------------------

def create_dataset(session: Session, name: str, result: IngestResult, settings: Settings, project_id: str) -> Dataset:
    """A new dataset (version 1) from an upload; refused only when no image at all is usable."""
    if not result.images:
        raise InvalidInput("the upload has no usable images; every file was left out (see rejected)",
                           rejected=result.rejected[:MAX_LISTED_IN_ERRORS])
    dataset = Dataset(project_id=project_id, name=name, version=1, frozen=False, rejected=result.rejected, report={},
                      classes=[], class_counts={}, split_counts={}, num_images=0, has_val_split=False)
    session.add(dataset)
    session.flush()
    _insert_images(session, dataset.id, result.images)
    _refresh(session, dataset, settings, result)
    return dataset


def add_images(session: Session, stage: Staging, dataset_id: str, files: Iterable[tuple[str | None, BinaryIO]],
               label: str | None, split: str | None, settings: Settings, project_id: str) -> tuple[Dataset, IngestResult]:
    """Add image files under one label (None: unlabeled, with no split); returns the dataset changed
    (a new version if it was frozen)."""
    if label is None:
        label, split = UNLABELED, None
    else:
        try:
            label = clean_label(label, settings.max_label_length)
        except LabelRejected as exc:
            raise InvalidInput(str(exc)) from None
    source = _lock(session, dataset_id, project_id)
    _refuse_superseded(session, source)
    _refuse_multi_label(source, "add images under one label")
    if label != UNLABELED:
        check_labels({label}, settings, existing=source.classes)
    existing = {row.sha256: (row.label, row.original_name) for row in session.execute(
        select(DatasetImage.sha256, DatasetImage.label, DatasetImage.original_name)
        .where(DatasetImage.dataset_id == source.id))}
    result = ingest_files(files, label, split, Intake(stage, settings, existing, existing_count=len(existing)))
    if not result.images:
        raise InvalidInput("none of the files is a usable new image; nothing was added (see rejected)",
                           rejected=result.rejected[:MAX_LISTED_IN_ERRORS])
    dataset = _writable(session, source)
    _insert_images(session, dataset.id, result.images)
    dataset.rejected = list(dataset.rejected) + result.rejected
    _refresh(session, dataset, settings, result)
    return dataset, result


def remove_image(session: Session, dataset_id: str, image_id: str, settings: Settings, project_id: str) -> Dataset:
    """Remove one image (by its id, the sha256); returns the dataset changed (maybe a new version)."""
    source = _lock(session, dataset_id, project_id)
    _refuse_superseded(session, source)
    present = _IMAGE_ID.fullmatch(image_id) and session.scalar(select(func.count()).select_from(DatasetImage)
                             .where(DatasetImage.dataset_id == source.id, DatasetImage.sha256 == image_id))
    if not present:
        raise NotFound(f"dataset {source.id} has no image with id {image_id[:80]!r}")
    dataset = _writable(session, source)
    session.execute(delete(DatasetImage).where(DatasetImage.dataset_id == dataset.id,
                                               DatasetImage.sha256 == image_id))
    _refresh(session, dataset, settings)
    return dataset


def label_images(session: Session, dataset_id: str, changes: list[tuple[str, str | None]], create_class: bool,
                 settings: Settings, project_id: str) -> Dataset:
    """Give images (by id) a label, or take it away (None: unlabeled again), all in one change;
    returns the dataset changed (a new version if a job has used it). A label that is no class of
    the dataset is refused, listing the classes, unless `create_class` (issue 16)."""
    source = _lock(session, dataset_id, project_id)
    _refuse_superseded(session, source)
    _refuse_multi_label(source, "give images one label")
    wanted: dict[str, str] = {}
    for image_id, raw in changes:
        if raw is None:
            label = UNLABELED
        else:
            try:
                label = clean_label(raw, settings.max_label_length)
            except LabelRejected as exc:
                raise InvalidInput(f"image {image_id[:80]!r}: {exc}") from None
        wanted[image_id] = label
    new = {label for label in wanted.values() if label != UNLABELED} - set(source.classes)
    if new and not create_class:
        classes = ", ".join(map(repr, source.classes[:MAX_LISTED_IN_ERRORS])) or "none yet"
        raise InvalidInput(f"{', '.join(map(repr, sorted(new)))} {'is' if len(new) == 1 else 'are'} not a class of "
                           f"dataset {source.id}; its classes are {classes}. Send create_class: true to add "
                           f"{'it' if len(new) == 1 else 'them'} as a new class",
                           classes=list(source.classes), unknown=sorted(new))
    if new:
        check_labels(new, settings, existing=source.classes)
    ids = [i for i in wanted if _IMAGE_ID.fullmatch(i)]
    present = set(session.scalars(select(DatasetImage.sha256).where(DatasetImage.dataset_id == source.id,
                                                                   DatasetImage.sha256.in_(ids)))) if ids else set()
    missing = [i for i in wanted if i not in present]
    if missing:
        raise NotFound(f"dataset {source.id} has no image with id {missing[0][:80]!r}"
                       + (f" (nor {len(missing) - 1} more of those sent)" if len(missing) > 1 else ""),
                       missing=[m[:80] for m in missing[:MAX_LISTED_IN_ERRORS]])
    dataset = _writable(session, source)
    for image_id, label in wanted.items():
        values = {"label": label} if label != UNLABELED else {"label": label, "split": None}
        session.execute(update(DatasetImage).where(DatasetImage.dataset_id == dataset.id,
                                                   DatasetImage.sha256 == image_id).values(**values))
    session.flush()
    _refresh(session, dataset, settings)
    return dataset


def dataset_for_job(session: Session, dataset_id: str, project_id: str) -> Dataset:
    """The dataset a new job will train on: refused (422, with the reasons) when it cannot train;
    otherwise frozen, so the job trains on exactly these images whatever changes later."""
    dataset = _lock(session, dataset_id, project_id)
    if not dataset.trainable:
        problems = (dataset.report or {}).get("problems") or ["the dataset is not trainable"]
        raise InvalidInput(f"dataset {dataset.id} (version {dataset.version}) cannot be trained: "
                           + "; ".join(problems), problems=problems)
    dataset.frozen = True
    return dataset


def images_for_training(session: Session, dataset_id: str) -> DatasetImages | None:
    """What a training job reads of a dataset version (None: the dataset is gone)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        return None
    rows = session.execute(select(DatasetImage.sha256, DatasetImage.label, DatasetImage.split, DatasetImage.labels)
                           .where(DatasetImage.dataset_id == dataset_id).order_by(DatasetImage.id)).all()
    # Unlabeled images (issue 16) apart: they never take part in the split. A multi-label image
    # (issue 17) carries its labels, maybe none.
    return DatasetImages(list(dataset.classes), [LabeledImage(r.sha256, r.label, r.split,
                                                              tuple(r.labels) if r.labels is not None else None)
                                                 for r in rows if r.label != UNLABELED],
                         unlabeled=[r.sha256 for r in rows if r.label == UNLABELED],
                         multi_label=dataset.task == MULTI_LABEL)


def _refuse_multi_label(dataset: Dataset, what: str) -> None:
    if dataset.task == MULTI_LABEL:
        raise InvalidInput(f"dataset {dataset.id} is multi-label (several labels per image); these calls {what}. "
                           "Upload a new zip whose labels.csv lists each image's labels to change it")


def _lock(session: Session, dataset_id: str, project_id: str) -> Dataset:
    _check_id(dataset_id, "dataset")
    dataset = session.get(Dataset, dataset_id, with_for_update=True)
    if dataset is None or dataset.project_id != project_id:
        raise NotFound(f"no dataset with id {dataset_id!r}")
    return dataset


def _refuse_superseded(session: Session, dataset: Dataset) -> None:
    if dataset.next_version_id:
        latest = latest_version(session, dataset)
        raise Conflict(f"dataset {dataset.id} is version {dataset.version}, which has a newer version "
                       f"({latest.id}, version {latest.version}); change that one",
                       latest_version_id=latest.id)


def latest_version(session: Session, dataset: Dataset) -> Dataset:
    while dataset.next_version_id:
        dataset = session.get(Dataset, dataset.next_version_id)
    return dataset


def _writable(session: Session, dataset: Dataset) -> Dataset:
    """The dataset itself when no job has used it; else its next version, created now."""
    if not dataset.frozen:
        return dataset
    new = Dataset(project_id=dataset.project_id, name=dataset.name, version=dataset.version + 1, previous_version_id=dataset.id,
                  frozen=False, rejected=list(dataset.rejected), report=dict(dataset.report or {}),
                  classes=list(dataset.classes), class_counts=dict(dataset.class_counts),
                  split_counts=dict(dataset.split_counts), num_images=dataset.num_images,
                  has_val_split=dataset.has_val_split, trainable=dataset.trainable, task=dataset.task)
    session.add(new)
    session.flush()
    columns = [getattr(DatasetImage, c) for c in _COPIED_COLUMNS]
    session.execute(insert(DatasetImage).from_select(
        ["dataset_id", *_COPIED_COLUMNS],
        select(literal(new.id), *columns).where(DatasetImage.dataset_id == dataset.id).order_by(DatasetImage.id)))
    dataset.next_version_id = new.id
    return new


def _insert_images(session: Session, dataset_id: str, images: list[IngestedImage]) -> None:
    session.add_all(DatasetImage(dataset_id=dataset_id, sha256=i.sha256, split=i.split,
                                 original_name=i.original_name, width=i.width, height=i.height,
                                 mode=i.mode, format=i.format, phash=i.phash, size_bytes=i.size_bytes,
                                 # a multi-label image (issue 17): its labels, and a marker in `label`
                                 label=i.label if i.labels is None else MULTI_LABEL_ROW,
                                 labels=list(i.labels) if i.labels is not None else None)
                    for i in images)
    session.flush()


def _refresh(session: Session, dataset: Dataset, settings: Settings, result: IngestResult | None = None) -> None:
    """Recompute the dataset's summary columns and cached report from its image rows."""
    previous = dataset.report or {}
    report = compute_report(session, dataset, settings,
                            duplicates=previous.get("duplicates", []) + (result.duplicates if result else []),
                            conflicts=previous.get("conflicts", []) + (result.conflicts if result else []))
    dataset.classes = report["classes"]
    dataset.class_counts = report["class_counts"]
    dataset.split_counts = report["split_counts"]
    dataset.num_images = report["num_images"]
    dataset.has_val_split = report["has_val_split"]
    dataset.trainable = report["trainable"]
    dataset.task = report.get("task", SINGLE_LABEL)
    dataset.report = report


def compute_report(session: Session, dataset: Dataset, settings: Settings, *, duplicates: list[dict],
                   conflicts: list[dict]) -> dict:
    rows = session.scalars(select(DatasetImage).where(DatasetImage.dataset_id == dataset.id)
                           .order_by(DatasetImage.id)).all()
    return build_report(rows, rejected=dataset.rejected, duplicates=duplicates, conflicts=conflicts,
                        settings=settings)


def report_of(session: Session, dataset: Dataset, settings: Settings) -> dict:
    """The dataset's report (computed on the fly for datasets from before reports existed)."""
    report = dataset.report
    if not report:  # created before reports: it keeps the verdict it was created with
        report = compute_report(session, dataset, settings, duplicates=[], conflicts=[])
        if dataset.trainable:
            report.update(trainable=True, problems=[], warnings=report["problems"] + report["warnings"])
    return {**report, "dataset_id": dataset.id, "version": dataset.version, "rejected": dataset.rejected}


def list_images(session: Session, dataset_id: str, label: str | None, limit: int, offset: int,
                project_id: str, unlabeled: bool | None = None) -> list[DatasetImage]:
    """`unlabeled`: True, only the images without a label; False, only those with one."""
    dataset = get_or_404(session, Dataset, dataset_id, "dataset", project_id)
    query = select(DatasetImage).where(DatasetImage.dataset_id == dataset.id)
    if unlabeled is not None:
        query = query.where((DatasetImage.label == UNLABELED) if unlabeled else (DatasetImage.label != UNLABELED))
    if label is not None and "\x00" in label:  # no label holds a NUL (and PostgreSQL cannot compare one)
        return []
    if label is not None and dataset.task == MULTI_LABEL:  # the images that have this label among theirs
        rows = [r for r in session.scalars(query.order_by(DatasetImage.id)) if label in (r.labels or ())]
        return rows[offset:offset + limit]
    if label is not None:
        query = query.where(DatasetImage.label == label)
    return list(session.scalars(query.order_by(DatasetImage.id).limit(limit).offset(offset)))


@contextmanager
def stored_model_errors(model_id: str) -> Iterator[None]:
    """A stored model that cannot be loaded is a 409 that says why, never a 500."""
    try:
        yield
    except (BackboneMismatch, WeightsUnavailable) as exc:  # a linear probe's backbone is the pretrained one
        raise Conflict(f"model {model_id} cannot be served: {exc}") from None
    except (UnknownBackbone, RegistryError) as exc:  # a registered backbone removed, or the registry unreadable
        raise Conflict(f"model {model_id} cannot be served: its backbone is not available here: {exc}") from None
    except (ArtifactCorrupt, FileNotFoundError):
        raise Conflict(f"model {model_id}'s stored file is missing or failed its sha256 check; retrain it") from None
