"""All of Graft's configuration: one Settings object, read from GRAFT_* environment variables."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, IPvAnyNetwork, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    data_dir: Path = Path("./data")
    # Default: a SQLite file inside data_dir (filled in by the validator below).
    database_url: str = ""
    workers: int = Field(1, ge=0, le=64, description="worker processes `graft serve` starts")
    allow_downloads: bool = Field(False, description=(
        "let jobs download missing backbone weights (torchvision's into the torch hub cache, timm/<model> "
        "ones into the Hugging Face cache); off, only files already on the machine are read"))
    backbones_file: Path | None = Field(None, description=(
        "the operator's registry of extra backbones (workers/backbone_registry.py) that `graft backbones "
        "add` writes; default <data dir>/backbones.json"))

    # API keys and quotas (service/api/auth.py). auth_required unset: open on a loopback address only.
    auth_required: bool | None = None
    allow_open_network: bool = Field(False, description="serve without keys on a non-loopback address")
    max_concurrent_jobs: int = Field(8, ge=0, description="per project, queued + running; 0 = no limit")
    max_datasets: int = Field(1000, ge=0, description="per project; 0 = no limit")
    max_stored_bytes: int = Field(50 * 1024**3, ge=0, description="per project, images; 0 = no limit")
    predict_rate_per_minute: int = Field(1200, ge=0, description="per project; 0 = no limit")
    upload_rate_per_minute: int = Field(60, ge=0, description="per project; 0 = no limit")
    metrics_token: SecretStr | None = Field(None, description=(
        "a bearer token for GET /metrics (Prometheus' `authorization` setting). Unset: /metrics answers "
        "without one only on loopback or where Graft runs open; an operator key is always accepted"))

    # Job queue
    poll_interval_s: float = Field(0.5, gt=0)
    listen_retry_s: float = Field(5.0, gt=0, description="PostgreSQL: how soon a worker reconnects its "
                                  "job-notification (LISTEN) connection after it dropped; it polls meanwhile")
    heartbeat_interval_s: float = Field(5.0, gt=0)
    stale_after_heartbeats: int = Field(3, ge=2)  # a job silent this many intervals is re-queued
    max_attempts: int = Field(3, ge=1)
    retry_backoff_s: float = Field(2.0, ge=0)
    cancel_poll_s: float = Field(1.0, gt=0, description="how often a running job checks for cancel")
    checkpoint_interval_s: float = Field(30.0, ge=0, description="at most one epoch checkpoint per this long; "
                                         "the first epoch is always saved")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time to finish the job "
                                    "before it is checkpointed and handed back")
    worker_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                               description="auto = the first GPU if there is one, else CPU")
    reaper_in_api: bool = Field(True, description="the API process also re-queues stalled jobs")

    # Webhooks (service/webhooks/)
    webhook_allow_private: bool = Field(False, description=(
        "deliver to loopback, private, link-local and other non-public addresses (a receiver on the "
        "server's own network); off, such URLs are refused at registration and at every hop"))
    webhook_allowed_networks: list[IPvAnyNetwork] = Field(default_factory=list, description=(
        'networks webhooks may reach even when private, as JSON: GRAFT_WEBHOOK_ALLOWED_NETWORKS=\'["10.1.2.0/24"]\''))
    webhook_dispatcher_in_api: bool = Field(True, description="the API process delivers webhooks (a thread)")
    webhook_poll_s: float = Field(0.2, gt=0, description="how often the dispatcher looks for due deliveries")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description=(
        "per phase of a request to a receiver: connecting, sending, waiting for the answer"))
    webhook_max_attempts: int = Field(8, ge=1, le=50, description="then the delivery is marked failed")
    webhook_backoff_s: float = Field(10.0, ge=0, description=(
        "the first retry's delay; doubled for each further one, with jitter, up to webhook_max_backoff_s"))
    webhook_max_backoff_s: float = Field(3600.0, ge=0)
    webhook_concurrency: int = Field(4, ge=1, le=64, description="deliveries one API process sends at once")

    # Uploads
    max_upload_bytes: int = 2 * 1024**3
    max_archive_entries: int = 100_000
    max_entry_bytes: int = 64 * 1024**2
    max_archive_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0
    max_image_pixels: int = Field(89_478_485, ge=1, description="per image, checked from its header")
    max_images_per_dataset: int = Field(20_000, ge=1)
    max_classes: int = Field(1000, ge=2)
    max_label_length: int = Field(100, ge=1, le=200)
    min_images_per_class: int = Field(5, ge=2, description="fewer and the dataset cannot train")
    recommended_images_per_class: int = Field(20, ge=2)
    max_predict_files: int = 64
    staging_max_age_s: float = Field(3600.0, ge=0, description=(
        "at start-up, upload staging folders (data_dir/tmp/upload-*) older than this are removed: what a "
        "killed process left behind. Younger ones may be another process's upload in progress (several "
        "API processes can share a data dir), so they are kept"))

    # Object storage (service/store/objects.py). Unset: files live under data_dir (the embedded default).
    storage_url: str = Field("", pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?)?$", description=(
        "s3://bucket/prefix: blobs, models, checkpoints, exports and batch results in an S3-compatible "
        "store; endpoint and credentials from the standard AWS variables (AWS_ENDPOINT_URL, "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION). data_dir then holds only this machine's cache"))
    storage_cache_mb: int = Field(4096, ge=0, description="object storage: MiB of stored files this machine "
                                  "keeps in data_dir/cache/objects (least recently used go first)")
    storage_timeout_s: float = Field(10.0, gt=0, description="object storage: connect and read timeout per request")
    storage_max_attempts: int = Field(3, ge=1, le=20, description="object storage: tries per request "
                                      "(botocore's standard retries) before the store counts as unavailable")
    storage_retry_after_s: float = Field(5.0, gt=0, description=(
        "object storage unavailable: the Retry-After of the API's 503, and how long a worker's job waits "
        "in the queue before it is tried again (the attempt is not counted)"))

    # Several API processes (`graft serve --api-processes N`) and replicas
    api_processes: int = Field(1, ge=1, le=64, description="API processes `graft serve` runs on one port, "
                               "each with its own inference engine")
    rate_limit_storage: str = Field("memory://", description=(
        "where rate limits are counted (the `limits` library's storage URI): memory:// counts in each API "
        "process; redis://host:6379/0 makes them hold across processes and machines"))

    # Training data path
    decoded_cache_mb: int = Field(16384, ge=0, description=(
        "disk space for decoded training images (data_dir/cache/decoded: one memory-mapped file per "
        "dataset and resolution, 3.9 GB for 20,000 images at 224 px), reused by every job on the same "
        "images; 0 = none kept: a job's images stay in memory if they fit half of worker_memory_mb, "
        "else in a scratch file removed after the job"))
    worker_memory_mb: int = Field(1024, ge=1, description=(
        "what a worker may hold of a job's data in memory: decoded images of recent jobs (up to half; "
        "beyond it they are read from the cache's memory map, batch by batch), the decoding batches (two "
        "of a sixteenth) and the linear-probe features kept for later jobs (a quarter, at most 256 MiB). "
        "The worker's own code, backbone and training batches come on top (about 1 GB on a CPU)"))
    warm_up_worker: bool = Field(True, description="GPU workers initialise CUDA and run the default "
                                 "backbone once at start, so the first job does not pay for it")

    # Prediction
    model_cache_mb: int = Field(1024, ge=1, description="MiB of model weights the API keeps loaded (LRU), "
                                "with the frozen copy a CPU server runs; a backbone shared by linear "
                                "probes counts once")
    torch_threads: int = Field(0, ge=0, description=(
        "intra-op threads: a worker's training, and each of the API's forward passes; 0 = PyTorch's default "
        "for workers, half the cores for the API (request threads decode images on the rest)"))
    predict_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                                description="where /predict runs: auto = the first GPU if there is one, else CPU")
    predict_max_batch: int = Field(0, ge=0, le=4096, description="images per forward pass; 0 = 2 on CPU, 256 on GPU")
    predict_batch_window_ms: float | None = Field(None, ge=0, le=1000, description=(
        "how long a waiting request may wait for others to share its forward pass; unset = 0 on CPU, 2 on GPU"))
    predict_parallel: int = Field(0, ge=0, le=64, description=(
        "forward passes the API runs at once, each on GRAFT_TORCH_THREADS threads; 0 = 2 on a CPU where "
        "each pass runs on one thread (2 cores by default), else 1"))

    batch_predict_step: int = Field(0, ge=0, le=4096, description=(
        "images a batch prediction job reads, predicts and writes per step (0 = the engine's batch, at least "
        "64); it checks for cancel after each step and checkpoints at most every GRAFT_CHECKPOINT_INTERVAL_S"))

    @model_validator(mode="after")
    def _default_database(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'graft.db').resolve()}"
        return self

    # -- the data dir's layout: every path under it is named here, and nowhere else ------------------
    @property
    def objects_root(self) -> Path:
        """Where stored files (blobs, models, checkpoints, exports, batch results) are read and written:
        the data dir itself, or with GRAFT_STORAGE_URL this machine's cache of the object store."""
        return self.data_dir / "cache" / "objects" if self.storage_url else self.data_dir

    @property
    def blobs_dir(self) -> Path:
        return self.objects_root / "blobs"

    @property
    def models_dir(self) -> Path:
        """Model artifacts, one folder each (a model row's artifact_dir is relative to the data dir)."""
        return self.objects_root / "models"

    @property
    def tmp_dir(self) -> Path:
        """Staging for uploads before their blobs are committed."""
        return self.data_dir / "tmp"

    @property
    def decoded_cache_dir(self) -> Path:
        return self.data_dir / "cache" / "decoded"

    @property
    def checkpoints_dir(self) -> Path:
        """Per-epoch training checkpoints, one folder per job."""
        return self.objects_root / "checkpoints"

    @property
    def batch_results_dir(self) -> Path:
        """Batch prediction results (results.csv, results.jsonl), one folder per job."""
        return self.objects_root / "batch_predictions"

    @property
    def exports_dir(self) -> Path:
        """Export zips (ONNX, safetensors, TorchScript), built once per model and format."""
        return self.objects_root / "exports"

    def data_path(self, relative: str) -> Path:
        """A path the database stores relative to the data dir (artifact_dir, checkpoint_file): its key
        in the object store (service/store/objects.py), at its local place."""
        return self.objects_root / relative

    def relative_to_data(self, path: Path) -> str:
        """How the database stores a path under the data dir: relative, so the dir can move."""
        return str(path.relative_to(self.objects_root))

    @property
    def backbone_registry_file(self) -> Path:
        """The operator's extra backbones on this machine (a file of this machine's, like the weights)."""
        return self.backbones_file or self.data_dir / "backbones.json"

    @property
    def stale_after_s(self) -> float:
        return self.heartbeat_interval_s * self.stale_after_heartbeats

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.blobs_dir, self.models_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
