"""ORM tables: datasets and their images, jobs (the queue), trained models."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, select
from sqlalchemy.orm import Mapped, column_property, mapped_column

from service.enums import JobStatus
from service.store.db import Base, UTCDateTime, utcnow


DEFAULT_PROJECT_ID = "default"  # owns what is created while Graft runs open (no API keys)


def new_id() -> str:
    return uuid.uuid4().hex


class Dataset(Base):
    __tablename__ = "dataset"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(32), index=True, default=DEFAULT_PROJECT_ID)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    classes: Mapped[list] = mapped_column(JSON)  # sorted label names
    class_counts: Mapped[dict] = mapped_column(JSON)  # label -> usable images
    split_counts: Mapped[dict] = mapped_column(JSON)  # "train"/"val"/"unsplit" -> label -> n
    num_images: Mapped[int] = mapped_column(Integer)
    has_val_split: Mapped[bool] = mapped_column(Boolean)
    rejected: Mapped[list] = mapped_column(JSON)  # [{"path", "reason"}]
    # Versions: a dataset a job has used is frozen; a change to it creates a new dataset row (the
    # next version) so jobs and models keep pointing at exactly the images they trained on.
    version: Mapped[int] = mapped_column(Integer, default=1)
    previous_version_id: Mapped[str | None] = mapped_column(String(32))
    next_version_id: Mapped[str | None] = mapped_column(String(32), index=True, unique=True)
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    trainable: Mapped[bool] = mapped_column(Boolean, default=True)
    report: Mapped[dict] = mapped_column(JSON, default=dict)  # service.datasets.report.build_report


class DatasetImage(Base):
    """One labeled image of a dataset; the bytes live once in the blob store under their sha256."""

    __tablename__ = "dataset_image"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("dataset.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    split: Mapped[str | None] = mapped_column(String(8))  # "train", "val" or None (split at job time)
    original_name: Mapped[str] = mapped_column(String(1024))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    mode: Mapped[str | None] = mapped_column(String(16))  # as stored in the file, before RGB
    format: Mapped[str | None] = mapped_column(String(16))
    phash: Mapped[str | None] = mapped_column(String(16))  # perceptual hash, 16 hex digits
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # counts toward the project's storage quota


class Job(Base):
    """A training run and its place in the queue. Worker writes are conditional on lease_token."""

    __tablename__ = "job"
    __table_args__ = (Index("ix_job_claim", "status", "priority", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(32), index=True, default=DEFAULT_PROJECT_ID)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("dataset.id"), index=True)
    config: Mapped[dict] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued)
    priority: Mapped[int] = mapped_column(Integer, default=0)  # lower runs first
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_token: Mapped[str | None] = mapped_column(String(32))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(32))
    requires_gpu: Mapped[bool] = mapped_column(Boolean, default=False)  # only GPU workers claim it
    attempt_history: Mapped[list] = mapped_column(JSON, default=list)  # one entry per ended attempt
    checkpoint_epoch: Mapped[int | None] = mapped_column(Integer)  # last epoch saved under the lease
    checkpoint_file: Mapped[str | None] = mapped_column(String(1024))  # relative to the data dir


class JobEvent(Base):
    """The job's log: state changes, per-epoch metrics, warnings. Streamed to users as SSE."""

    __tablename__ = "job_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # status | epoch | warning
    data: Mapped[dict] = mapped_column(JSON)


class WorkerRecord(Base):
    """A worker process as it last reported itself; live while its heartbeat is fresh."""

    __tablename__ = "worker"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    current_job_id: Mapped[str | None] = mapped_column(String(32))
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Model(Base):
    """A trained classifier: safetensors + manifest under the data dir, verified by sha256."""

    __tablename__ = "model"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(32), index=True, default=DEFAULT_PROJECT_ID)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id"), unique=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("dataset.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    backbone: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    recipe: Mapped[dict] = mapped_column(JSON)
    artifact_dir: Mapped[str] = mapped_column(String(1024))  # relative to the data dir
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)


# The dataset version a job or model used: a dataset row never changes version, so this is read
# through the dataset rather than copied (no migration of job or model needed).
Job.dataset_version = column_property(
    select(Dataset.version).where(Dataset.id == Job.dataset_id).correlate_except(Dataset).scalar_subquery())
Model.dataset_version = column_property(
    select(Dataset.version).where(Dataset.id == Model.dataset_id).correlate_except(Dataset).scalar_subquery())


class Project(Base):
    """Owns datasets, jobs and models; API keys belong to one project."""

    __tablename__ = "project"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    quotas: Mapped[dict] = mapped_column(JSON, default=dict)  # overrides of the Settings defaults


class ApiKey(Base):
    """Only the key's SHA-256 is stored, with a short prefix to recognise it by."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # admin | train | predict (each includes the next)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
