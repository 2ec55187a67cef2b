"""HTTP request and response bodies (pydantic v2)."""
from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from workers.config import TrainConfig

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Rejection(BaseModel):
    path: str
    reason: str


class BackboneOut(Out):
    name: str
    weights_available: bool
    input_size: int
    feature_dim: int
    weights_path: str


class DatasetOut(Out):
    id: str
    name: str
    created_at: datetime
    classes: list[str]
    class_counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    num_images: int
    has_val_split: bool
    rejected: list[Rejection]


class JobCreate(TrainConfig):
    """A training job: a dataset plus a recipe; every recipe field has a default."""

    dataset_id: str = Field(min_length=1, max_length=64)
    priority: int = Field(0, ge=-100, le=100, description="lower runs first")
    device: Literal["any", "gpu"] = Field("any", description="gpu: only a GPU worker may run it")


class JobError(BaseModel):
    code: str
    message: str


class JobOut(Out):
    id: str
    dataset_id: str
    status: JobStatus
    config: dict
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    progress: dict
    model_id: str | None
    error: JobError | None = None
    cancel_requested: bool
    requires_gpu: bool
    attempt_history: list[dict]
    checkpoint_epoch: int | None = Field(None, description="last epoch checkpointed; a retry resumes after it")

    @classmethod
    def of(cls, job) -> "JobOut":
        out = cls.model_validate(job)
        if job.error_code and job.status in ("failed", "queued"):
            out.error = JobError(code=job.error_code, message=job.error_message or "")
        return out


class ModelOut(Out):
    id: str
    job_id: str
    dataset_id: str
    created_at: datetime
    backbone: str
    classes: list[str]
    metrics: dict
    recipe: dict
    sha256: str
    size_bytes: int


class Prediction(BaseModel):
    label: str
    score: float


class PredictResult(BaseModel):
    filename: str
    predictions: list[Prediction]


class PredictResponse(BaseModel):
    model_id: str
    results: list[PredictResult]


class JobEventOut(Out):
    id: int
    kind: str
    data: dict
    created_at: datetime


class WorkerOut(Out):
    id: str
    host: str
    pid: int
    device: str
    started_at: datetime
    heartbeat_at: datetime
    current_job_id: str | None
