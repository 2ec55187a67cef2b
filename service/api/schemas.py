"""HTTP request and response bodies (pydantic v2)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field, model_validator

from service.enums import JobKind, JobStatus, Scope
from service.webhooks.events import DeliveryStatus, WebhookEvent
from workers.config import TrainConfig


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Rejection(BaseModel):
    path: str
    reason: str


class BackboneOut(Out):
    name: str = Field(description="what a job's `backbone` names")
    source: Literal["package", "torchvision", "timm", "registered"] = Field(description=(
        "where the weights come from: package (installed with Graft), torchvision (the torch hub cache), "
        "timm (timm/<model>: the Hugging Face cache), registered (a file the operator registered)"))
    weights_available: bool
    input_size: int = Field(description="the native crop side in pixels (a job's default image_size)")
    fixed_input_size: bool = Field(description="true: image_size must be input_size (ViT position embeddings)")
    feature_dim: int
    fine_tune_top: bool = Field(description="whether strategy fine_tune_top can cut this backbone between stages")
    weights_path: str | None = Field(description="where the weights are read from, or expected; null when they ship "
                                                 "in a Python package that is not installed")
    weights_bytes: int | None = Field(None, description="size of the weights file; null when it is not on this machine")
    timm_arch: str | None = Field(None, description="timm backbones: the timm model (architecture and pretrained "
                                                    "config)")
    sha256: str | None = Field(None, description="registered backbones: the file's sha256, checked at every load")


class ImageRef(BaseModel):
    id: str = Field(description="the image's id in the dataset: the sha256 of its bytes")
    path: str = Field(description="the name it was uploaded under (cleaned; metadata only)")
    label: str | None = Field(description="null: an unlabeled image")
    split: str | None


class LeakagePair(BaseModel):
    """Two near-identical images on different sides; exactly two of train, val and test are set."""
    train: ImageRef | None = Field(None, description="the image that trains (train/, or unsplit when "
                                                     "there is no val split)")
    val: ImageRef | None = None
    test: ImageRef | None = None
    distance: int = Field(description="perceptual-hash distance in bits (0 = looks identical)")


class NearDuplicatePair(BaseModel):
    a: ImageRef
    b: ImageRef
    distance: int


class DuplicateGroup(BaseModel):
    label: str
    kept: str
    dropped: list[str]


class LabelConflict(BaseModel):
    sha256: str
    labels: list[str]
    paths: list[str]


class Spread(BaseModel):
    min: int
    median: float
    max: int


class ImageStats(BaseModel):
    width: Spread | None
    height: Spread | None
    modes: dict[str, int] = Field(description="pixel modes as stored (RGB, L, CMYK, P, RGBA...)")
    formats: dict[str, int]


class DatasetReport(BaseModel):
    """What is in a dataset, what was left out and why, and whether it can train."""

    dataset_id: str
    version: int
    trainable: bool
    problems: list[str] = Field(description="why the dataset cannot train; empty when it can")
    warnings: list[str] = Field(description="things to fix for a better model")
    num_images: int
    classes: list[str]
    class_counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    has_val_split: bool
    imbalance_ratio: float | None = Field(description="largest class size / smallest")
    rejected: list[Rejection]
    duplicates: list[DuplicateGroup] = Field(description="exact copies within a class, kept once")
    conflicts: list[LabelConflict] = Field(description="the same bytes under several labels, left out")
    leakage: list[LeakagePair] = Field(description="near-duplicates across train, val and test (first 100)")
    leakage_count: int
    near_duplicates: list[NearDuplicatePair] = Field(description="other near-duplicate pairs (first 100)")
    near_duplicate_count: int
    num_labeled: int | None = Field(None, description="images with a label (num_images counts the unlabeled too)")
    unlabeled_count: int = Field(0, description="images without a label: in no class, never validated on")
    unlabeled_near_duplicates: list[NearDuplicatePair] = Field(default_factory=list, description=(
        "an unlabeled image (b) near-identical to a labeled one (a) (first 100)"))
    unlabeled_near_duplicate_count: int = 0
    image_stats: ImageStats
    # Issue 17: multi-label datasets (several labels per image); the fields below are theirs.
    task: Literal["single_label", "multi_label"] = Field("single_label", description=(
        "multi_label: each image has any number of the labels (a labels.csv `labels` column); class_counts "
        "and split_counts then count each label's images"))
    labels_per_image: dict[str, int] | None = Field(None, description="multi_label: images by how many labels "
                                                                      "they have ('0': none of them)")
    images_without_labels: dict[str, int] | None = Field(None, description=(
        "multi_label: images with none of the labels (allowed: negatives for every label), in total and by split"))
    label_cooccurrence: dict | None = Field(None, description=(
        "multi_label: {labels, matrix}: matrix[i][j] images having both labels i and j (the diagonal: each label)"))


class DatasetOut(Out):
    id: str
    name: str
    created_at: datetime
    version: int = Field(description="1 for an upload; +1 each time a dataset a job used is changed")
    previous_version_id: str | None
    next_version_id: str | None = Field(description="set once this version has a successor")
    frozen: bool = Field(description="a job used this version; changes create a new version")
    trainable: bool
    classes: list[str]
    class_counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    num_images: int
    has_val_split: bool
    rejected: list[Rejection]
    report: DatasetReport | None = None
    task: Literal["single_label", "multi_label"] = Field("single_label", description=(
        "multi_label: several labels per image (issue 17); models trained on it answer every label over its "
        "threshold"))


class DatasetImageOut(BaseModel):
    id: str = Field(description="the sha256 of the image's bytes; use it to remove the image")
    label: str | None = Field(description="null: unlabeled (label it with PATCH .../images/{id})")
    split: str | None
    original_name: str
    width: int
    height: int
    mode: str | None
    format: str | None
    labels: list[str] | None = Field(None, description="multi-label datasets: the image's labels ([]: none of "
                                                       "them; `label` then shows them joined by '; ')")


class ImageLabel(BaseModel):
    """A label for one image (issue 16)."""
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(max_length=1000, description="a class of the dataset; null makes the image unlabeled")
    create_class: bool = Field(False, description="true: a label that is no class yet becomes a new class")


class ImageLabelChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=200, description="the image's id (sha256)")
    label: str | None = Field(max_length=1000, description="a class of the dataset; null: unlabeled")


class ImageLabels(BaseModel):
    """Labels for several images at once: one change, one new version at most (issue 16)."""
    model_config = ConfigDict(extra="forbid")

    images: list[ImageLabelChange] = Field(min_length=1, max_length=1000)
    create_class: bool = Field(False, description="true: labels that are no class yet become new classes")


class SuggestedLabel(BaseModel):
    label: str
    score: float


class Suggestion(BaseModel):
    rank: int
    image_id: str
    original_name: str
    thumbnail: str = Field(description="the image's thumbnail URL")
    predicted_label: str = Field(description="the model's guess: the pre-label")
    score: float = Field(description="its calibrated probability")
    margin: float = Field(description="top probability minus the second (multi-label: the smallest |2p - 1|)")
    entropy: float
    predictions: list[SuggestedLabel] = Field(description="the model's top classes")


class SuggestionsOut(BaseModel):
    """Which unlabeled images to label next (issue 16)."""
    model_id: str
    dataset_id: str
    dataset_version: int
    strategy: Literal["margin", "entropy", "diverse"]
    unlabeled_images: int = Field(description="the dataset's unlabeled images")
    scored_images: int = Field(description="those the model scored (a stored image that no longer decodes is not)")
    seconds: float
    suggestions: list[Suggestion]


class JobCreate(TrainConfig):
    """A training job: a dataset plus a recipe; every recipe field has a default."""

    dataset_id: str = Field(min_length=1, max_length=64)
    priority: int = Field(0, ge=-100, le=100, description="lower runs first")
    device: Literal["any", "gpu"] = Field("any", description="gpu: only a GPU worker may run it")
    # The fields the request itself gave (not null), before defaults were filled in: a base model's
    # backbone and image size fill only what the caller left out (service/datasets/lineage.py).
    _given: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _remember_given(cls, data, handler):
        job = handler(data)
        if isinstance(data, dict):
            job._given = frozenset(k for k, v in data.items() if v is not None)
        return job


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
    progress: dict = Field(description=(
        "what the job is doing: its current phase (phase, unit, done, total, rate per second, eta_s, "
        "elapsed_s, and the phase's own fields such as epoch or candidate), every phase so far "
        "(phases) and, for strategy auto, the finished candidates best first (leaderboard); the "
        "events of kind progress, epoch and candidate carry the same as it happens"))
    model_id: str | None
    error: JobError | None = None
    cancel_requested: bool
    requires_gpu: bool
    attempt_history: list[dict]
    checkpoint_epoch: int | None = Field(None, description="last epoch checkpointed; a retry resumes after it")
    dataset_version: int | None = Field(None, description="the version of the dataset the job trains on")
    kind: JobKind = Field(JobKind.train, description="train, or batch_predict (see /v1/batch-predictions/{id})")

    @classmethod
    def of(cls, job) -> "JobOut":
        out = cls.model_validate(job)
        if job.error_code and job.status in (JobStatus.failed, JobStatus.queued):
            out.error = JobError(code=job.error_code, message=job.error_message or "")
        return out


class ModelOut(Out):
    id: str
    job_id: str
    dataset_id: str
    created_at: datetime
    backbone: str
    classes: list[str]
    metrics: dict = Field(description="scores on val (or out of sample, for auto); `test`, when the dataset "
                                      "has a test split: the finished model's scores on it (accuracy, loss, "
                                      "balanced_accuracy, macro_f1, ece, per_class, confusion_matrix)")
    recipe: dict
    sha256: str
    size_bytes: int
    dataset_version: int | None = Field(None, description="the version of the dataset it was trained on")

    @computed_field(description="the model's plots as PNG (GET each URL): training_curves, confusion_matrix, "
                                "reliability, precision_recall, where the model has their data")
    @property
    def plots(self) -> dict[str, str]:
        from service.serving.insights import plot_names
        return {name: f"/v1/models/{self.id}/plots/{name}" for name in plot_names(self.metrics)}

    @computed_field(description="its held-out predictions per image (GET); null for a model trained before "
                                "Graft kept them")
    @property
    def evaluation(self) -> str | None:
        return f"/v1/models/{self.id}/evaluation" if self.metrics.get("held_out") else None


class Prediction(BaseModel):
    label: str
    score: float


class OodScore(BaseModel):
    kind: str = Field(description="the model's out-of-distribution score: cosine (to its classes' mean features), "
                      "energy or max_probability; higher means more like its training images")
    score: float
    threshold: float = Field(description="below it the image is unknown: the model's own (95% of its held-out "
                             "images pass) or the request's min_score")


class PredictResult(BaseModel):
    filename: str
    label: str | None = Field(None, description="the top class; null when unknown")
    unknown: bool = Field(False, description="none of the model's classes: its out-of-distribution score is below "
                          "the threshold, or its top class is the negative class `_negative`")
    ood: OodScore | None = Field(None, description="null for models without a stored score (made before it)")
    predictions: list[Prediction]
    # Issue 17: multi-label models.
    labels: list[str] | None = Field(None, description=(
        "multi-label models: every label whose score is at or over its threshold (the model's "
        "metrics.thresholds), highest score first; [] when none is. predictions then holds the top_k scores"))
    scores: dict[str, float] | None = Field(None, description="multi-label models: every label's score "
                                                               "(calibrated sigmoid probability)")


class PredictResponse(BaseModel):
    model_id: str
    results: list[PredictResult]


class JobEventOut(Out):
    id: int = Field(validation_alias="seq", description="the event's number within its job (1, 2, ...): "
                    "resume after it with `after_id` or `Last-Event-ID`")
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


QuotaName = Literal["max_concurrent_jobs", "max_datasets", "max_stored_bytes", "predict_rate_per_minute",
                   "upload_rate_per_minute"]


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$")
    quotas: dict[QuotaName, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="overrides of the server defaults; 0 = no limit")


class ProjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    quotas: dict[QuotaName, Annotated[int, Field(ge=0)] | None] = Field(
        description="quotas to change; 0 = no limit, null = back to the server's default")


class ProjectDeleted(BaseModel):
    id: str
    deleted: dict[str, int] = Field(description="rows removed (datasets, images, models, jobs, keys) and "
                                                "blobs: image files no other project holds")


class ProjectOut(Out):
    id: str
    name: str
    created_at: datetime
    quotas: dict[str, int]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    scope: Scope = Field(description="admin: projects and keys (and all below); train: datasets, jobs, "
                                     "models (and predict); predict: predict only")
    aliases: list[str] | None = Field(None, min_length=1, max_length=100, description=(
        "predict keys only: limit the key to predicting through these aliases of the project (they must "
        "exist); it may then not predict by model id. Omit for a key that may predict with any model"))


class KeyOut(Out):
    id: str
    project_id: str
    name: str
    prefix: str
    scope: Scope
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    aliases: list[str] | None = Field(None, description="the only aliases it may predict through; null: any model")


class KeyCreated(KeyOut):
    key: str = Field(description="shown once: store it now, Graft keeps only its SHA-256")


class ProjectCreated(BaseModel):
    project: ProjectOut
    admin_key: KeyCreated


class CheckResult(BaseModel):
    """One /readyz check; a passing one adds what it found (dialect, revision; path, free_bytes)."""
    model_config = ConfigDict(extra="allow")
    ok: bool
    seconds: float
    error: str | None = Field(None, description="what failed, when ok is false")


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, CheckResult] | None = Field(None, description=(
        "each check's findings: only for the operator, or a caller on the server's machine"))


# --- aliases (issue 18) ---
class AliasPut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=64, description="a ready model of this project (or the id of "
                                                                   "the job that trained it)")


class AliasOut(Out):
    name: str
    model_id: str = Field(description="the model it points at now")
    created_at: datetime
    updated_at: datetime = Field(description="when it last moved")


class AliasMoveOut(Out):
    from_model_id: str | None = Field(description="null: the alias was created by this move")
    to_model_id: str | None = Field(description="null: the alias was deleted")
    key_id: str | None = Field(description="the API key that moved it; null where Graft runs without keys")
    moved_at: datetime


class AliasPredictResponse(PredictResponse):
    alias: str = Field(description="the alias predicted through; model_id names the model that answered")


# --- webhooks (issue 18) ---
class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048, description="http:// or https://; public addresses only "
                     "unless the operator set GRAFT_WEBHOOK_ALLOW_PRIVATE")
    events: list[WebhookEvent] = Field(min_length=1, max_length=len(WebhookEvent), description="what to send")


class WebhookOut(Out):
    id: str
    project_id: str
    url: str
    events: list[WebhookEvent]
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="shown once: verifies the Graft-Signature header of every delivery")


class WebhookAttemptOut(Out):
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None = Field(description="the receiver's answer; null when there was none")
    error: str | None = Field(description="why it did not succeed (timeout, refused address, non-2xx); null: 2xx")
    next_retry_at: datetime | None = Field(description="when it is tried again; null: no retry follows")


class WebhookDeliveryOut(Out):
    id: str
    event: WebhookEvent
    status: DeliveryStatus
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="while pending: when it is sent next")
    attempts: list[WebhookAttemptOut]


# -- batch predictions (issue 18) -----------------------------------------------------------------

class BatchPredictionCreate(BaseModel):
    """What a batch prediction predicts: a dataset of the project (JSON), or a zip sent as multipart
    `file` (then dataset_id is absent)."""

    model_config = ConfigDict(extra="forbid")
    dataset_id: str | None = Field(None, min_length=1, max_length=200,
                                   description="a dataset of this project; its images are predicted in upload order")
    top_k: int = Field(5, ge=1, le=1000, description="labels per image, best first; capped at the model's classes")


class BatchProgress(BaseModel):
    done: int = Field(description="images predicted so far")
    total: int = Field(description="images to predict")


class BatchLinks(BaseModel):
    self: str
    results_csv: str = Field(description="409 until the batch prediction has succeeded")
    results_jsonl: str = Field(description="409 until the batch prediction has succeeded")
    job: str = Field(description="the job it runs as: events, cancel")


class BatchPredictionOut(BaseModel):
    id: str = Field(description="also the id of the job it runs as")
    model_id: str
    dataset_id: str = Field(description="the images predicted (an uploaded zip becomes an unlabeled dataset)")
    status: JobStatus
    top_k: int
    progress: BatchProgress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    cancel_requested: bool
    error: JobError | None = None
    links: BatchLinks


# -- explanations and held-out predictions (issue 19) --------------------------------------------

class Overlay(BaseModel):
    media_type: Literal["image/png"]
    width: int
    height: int
    data: str = Field(description="the PNG, base64: the crop the model sees with the heatmap blended over it")


class Heatmap(BaseModel):
    shape: list[int] = Field(description="[height, width] of the last convolutional stage's map")
    values: list[list[float]] = Field(description="the map (Grad-CAM: >= 0, unnormalized), row by row")


class Explanation(BaseModel):
    filename: str
    label: str = Field(description="the label explained: the one asked for, else the top prediction")
    score: float = Field(description="its calibrated probability, as /predict answers")
    predictions: list[Prediction] = Field(description="the top labels, as /predict answers")
    overlay: Overlay
    heatmap: Heatmap | None = Field(None, description="the raw map, with raw=true")


class ExplainResponse(BaseModel):
    model_id: str
    method: Literal["gradcam", "gradcampp"]
    results: list[Explanation]


class HeldOutRow(BaseModel):
    image_id: str = Field(description="the image's id (sha256) in the dataset the model trained on")
    subset: Literal["validation", "test"]
    split: Literal["train", "val", "test"] = Field(description="the image's role in the job that trained the model")
    true_label: str
    predicted_label: str
    correct: bool
    probability: float = Field(description="calibrated probability of the predicted label")
    true_probability: float = Field(description="calibrated probability of the true label")
    loss: float = Field(description="-log(true_probability): the top losses are the worst mistakes")
    thumbnail: str = Field(description="GET: a small JPEG of the image")


class EvaluationOut(BaseModel):
    model_id: str
    dataset_id: str
    predictions: str = Field(description="val: the model's own, on images it did not train on; out of fold: "
                                         "auto's cross-validation, each image by a fold model that did not see it")
    subset: Literal["validation", "test"]
    total: int = Field(description="rows matching the filters")
    offset: int
    rows: list[HeldOutRow]
