"""ORM tables: datasets and their images, jobs (the queue), trained models."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, select
from sqlalchemy.orm import Mapped, column_property, mapped_column

from service.enums import JobKind, JobStatus
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
    # "single_label" (one class per image) or "multi_label" (each image any of the labels; issue 17)
    task: Mapped[str] = mapped_column(String(16), default="single_label", server_default="single_label")


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
    # Multi-label datasets: the image's labels (maybe none); `label` then holds MULTI_LABEL_ROW.
    labels: Mapped[list | None] = mapped_column(JSON)


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
    event_seq: Mapped[int] = mapped_column(Integer, default=0)  # the seq of the job's last event
    kind: Mapped[str] = mapped_column(String(16), default=JobKind.train, server_default=JobKind.train)
    source_model_id: Mapped[str | None] = mapped_column(String(32))  # batch_predict: the model it predicts with


class JobEvent(Base):
    """The job's log: state changes, per-epoch metrics, warnings. Streamed to users as SSE."""

    __tablename__ = "job_event"
    __table_args__ = (Index("uq_job_event_job_id_seq", "job_id", "seq", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    # 1, 2, ... within the job: what users see as the event's id (the global id would show how
    # many events every other tenant's jobs wrote meanwhile).
    seq: Mapped[int] = mapped_column(Integer)
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
    __table_args__ = (Index("uq_project_name_key", "name_key", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    # service.datasets.names.name_key(name): 'Beta', 'beta ' and 'beta.' are one name
    name_key: Mapped[str] = mapped_column(String(100))
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
    operator: Mapped[bool] = mapped_column(Boolean, default=False)  # acts on the whole server (projects, quotas)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    aliases: Mapped[list | None] = mapped_column(JSON)  # a predict key limited to these aliases; None: any model


# --- aliases (issue 18): tables below this line ---


class ModelAlias(Base):
    """A project's named pointer to one of its models (`prod`, `staging`): clients predict by name."""

    __tablename__ = "model_alias"
    __table_args__ = (Index("uq_model_alias_project_id_name", "project_id", "name", unique=True),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(String(32), index=True)
    name: Mapped[str] = mapped_column(String(63))  # service.store.aliases.ALIAS_NAME
    model_id: Mapped[str] = mapped_column(ForeignKey("model.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AliasMove(Base):
    """One move of an alias: kept by (project, name) so the history outlives a deleted alias."""

    __tablename__ = "alias_move"
    __table_args__ = (Index("ix_alias_move_project_id_alias", "project_id", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(32))
    alias: Mapped[str] = mapped_column(String(63))
    from_model_id: Mapped[str | None] = mapped_column(String(32))  # None: the alias was created
    to_model_id: Mapped[str | None] = mapped_column(String(32))  # None: the alias was deleted
    key_id: Mapped[str | None] = mapped_column(String(32))  # None: open mode, no key
    moved_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)



# --- webhooks (issue 18): tables below this line ---


class Webhook(Base):
    """A project's receiver of events. The secret is kept as given: signing needs it (README)."""

    __tablename__ = "webhook"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    project_id: Mapped[str] = mapped_column(ForeignKey("project.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list] = mapped_column(JSON)  # service.webhooks.events.WebhookEvent values
    secret: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookDelivery(Base):
    """One event for one webhook (the outbox row), written in the transaction that caused it."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (Index("ix_webhook_delivery_due", "status", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhook.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(String(32), index=True)
    event: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)  # the exact JSON sent and signed, the same on every retry
    status: Mapped[str] = mapped_column(String(16), default="pending")  # DeliveryStatus
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # A dispatcher's claim: another one skips the row until claimed_until has passed.
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookAttempt(Base):
    """One try at sending a delivery: what the receiver answered, or why it could not."""

    __tablename__ = "webhook_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_delivery.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 1, 2, ... within the delivery
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    next_retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # None: no retry follows


# --- batch predictions (issue 18): tables below this line ---
