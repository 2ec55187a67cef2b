"""The closed sets of values the server, the store and the HTTP client share.

Dependency-free on purpose: the client and the CLI import it, and they must start without
SQLAlchemy, FastAPI or torch. The queue (service/store/queue.py) re-exports JobStatus.
"""
from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ACTIVE: tuple[JobStatus, ...] = (JobStatus.queued, JobStatus.running)  # count against a project's job quota
TERMINAL: tuple[JobStatus, ...] = (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)  # never change again


class JobKind(StrEnum):
    """What a job does: train a model, or predict a set of images with one (issue 18)."""

    train = "train"
    batch_predict = "batch_predict"


class ExportFormat(StrEnum):
    onnx = "onnx"
    safetensors = "safetensors"
    torchscript = "torchscript"


class Scope(StrEnum):
    """An API key's scope; they nest: admin includes train, which includes predict."""

    admin = "admin"
    train = "train"
    predict = "predict"
