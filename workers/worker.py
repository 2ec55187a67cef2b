"""The worker loop: claim a job, train it under a heartbeat-renewed lease, publish the model."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid

import torch

from service.blobs import BlobStore
from service.db import Database, utcnow
from service.queue import Claim, JobQueue
from service.settings import Settings
from service.tables import Model
from workers.artifacts import write_artifact
from workers.backbones import WeightsUnavailable, get_backbone
from workers.config import TrainConfig
from workers.data import prepare_data
from workers.errors import JobError, StopJob
from workers.training import pick_device, train

log = logging.getLogger("graft.worker")


class LeaseControl:
    """Keeps the lease alive from a background thread and tells the training loop when to stop."""

    PROGRESS_EVERY_S = 1.0

    def __init__(self, queue: JobQueue, claim: Claim, interval_s: float, shutdown: threading.Event):
        self.queue, self.claim, self.interval_s, self.shutdown = queue, claim, interval_s, shutdown
        self.stop_reason: str | None = None
        self._progress: dict = {}
        self._last_write = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> "LeaseControl":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                state = self.queue.heartbeat(self.claim)
            except Exception:  # a database blip: keep trying until the lease runs out
                log.warning("heartbeat failed", exc_info=True, extra={"action": "heartbeat"})
                continue
            if state != "ok":
                self.stop_reason = state  # "cancel" or "lost"

    def checkpoint(self) -> None:
        if self.stop_reason:
            raise StopJob(self.stop_reason)
        if self.shutdown.is_set():
            raise StopJob("shutdown")

    def progress(self, update: dict) -> None:
        new_phase = update.get("phase") != self._progress.get("phase")
        self._progress = {**self._progress, **update}
        now = time.monotonic()
        if new_phase or "val_accuracy" in update or now - self._last_write >= self.PROGRESS_EVERY_S:
            self._last_write = now
            if not self.queue.report_progress(self.claim, self._progress):
                self.stop_reason = self.stop_reason or "lost"


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = Database(settings.database_url)
        self.queue = JobQueue(self.db, stale_after_s=settings.stale_after_s,
                              retry_backoff_s=settings.retry_backoff_s)
        self.blobs = BlobStore(settings.blobs_dir)
        self.device = pick_device()
        self.shutdown = threading.Event()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.shutdown.set())

    def run(self, max_jobs: int | None = None) -> None:
        log.info("worker %s started on %s", self.worker_id, self.device, extra={"action": "worker_start"})
        done, last_reap = 0, 0.0
        while not self.shutdown.is_set() and (max_jobs is None or done < max_jobs):
            if time.monotonic() - last_reap >= self.settings.heartbeat_interval_s:
                last_reap = time.monotonic()
                for job_id in self.queue.requeue_stale():
                    log.warning("re-queued stalled job %s", job_id, extra={"action": "requeue_stale"})
            claim = self.queue.claim(self.worker_id)
            if claim is None:
                self.shutdown.wait(self.settings.poll_interval_s)
                continue
            self.run_job(claim)
            done += 1
        self.db.dispose()

    def run_job(self, claim: Claim) -> None:
        log.info("running job %s (attempt %d)", claim.job_id, claim.attempt, extra={"action": "job_start"})
        with LeaseControl(self.queue, claim, self.settings.heartbeat_interval_s, self.shutdown) as control:
            try:
                self._train_and_publish(claim, control)
            except StopJob as stop:
                self._stopped(claim, stop.reason)
            except JobError as err:
                self.queue.fail(claim, err.code, err.message, retryable=False)
            except (torch.cuda.OutOfMemoryError, MemoryError):
                self.queue.fail(claim, "out_of_memory", "the worker ran out of memory; try a smaller "
                                "batch_size or image_size", retryable=True)
            except Exception as exc:
                log.exception("job %s crashed", claim.job_id, extra={"action": "job_error"})
                self.queue.fail(claim, "internal_error", f"{type(exc).__name__}: {exc}", retryable=True)

    def _stopped(self, claim: Claim, reason: str) -> None:
        if reason == "cancel":
            self.queue.finish_cancelled(claim)
        elif reason == "shutdown":
            self.queue.release(claim)
        log.info("job %s stopped: %s", claim.job_id, reason, extra={"action": "job_stop"})

    def _train_and_publish(self, claim: Claim, control: LeaseControl) -> None:
        config = TrainConfig.model_validate(claim.config)
        spec = get_backbone(config.backbone)
        pre = spec.preprocessing.at_size(config.image_size)
        try:
            features = spec.build_features(pretrained=True, allow_downloads=self.settings.allow_downloads)
        except WeightsUnavailable as exc:
            raise JobError("weights_missing", str(exc)) from None
        data = prepare_data(self.db, self.blobs, claim.dataset_id, config, pre, control)
        result = train(config, data, features, spec.feature_dim, control, self.device)
        control.checkpoint()
        model_id = uuid.uuid4().hex
        metrics = {**result.metrics, "history": result.history, "device": str(self.device)}
        manifest = {"model_id": model_id, "job_id": claim.job_id, "dataset_id": claim.dataset_id,
                    "backbone": spec.name, "classes": data.classes, "preprocessing": pre.to_dict(),
                    "recipe": config.model_dump(), "metrics": metrics, "created_at": utcnow().isoformat()}
        path, digest, size = write_artifact(self.settings.models_dir, model_id, result.classifier, manifest)
        model = Model(id=model_id, job_id=claim.job_id, dataset_id=claim.dataset_id, backbone=spec.name,
                      classes=data.classes, metrics=metrics, recipe=config.model_dump(),
                      artifact_dir=str(path.relative_to(self.settings.data_dir)), sha256=digest,
                      size_bytes=size)
        if not self.queue.publish(claim, model):
            shutil.rmtree(path, ignore_errors=True)  # another worker owns the job now
            log.warning("lease lost before publishing job %s", claim.job_id, extra={"action": "publish_lost"})
            return
        log.info("job %s succeeded: model %s, val_accuracy %.4f", claim.job_id, model_id,
                 metrics["val_accuracy"], extra={"action": "job_done"})
