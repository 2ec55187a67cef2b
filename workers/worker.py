"""The worker loop: claim a job, train it under a heartbeat-renewed lease, publish the model."""
from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import socket
import threading
import time
import uuid
from typing import Callable

import torch
from pydantic import ValidationError

from service.datasets.catalog import images_for_training
from service.store.blobs import BlobStore
from service.store.objects import StorageUnavailable, store_for
from service.store.db import Database, utcnow
from service.store.queue import Claim, JobQueue, ModelRecord
from service.store.tables import Model
from service.settings import Settings
from service.store.wakeups import JobWaiter
from service.enums import JobKind
from workers.artifacts import (MANIFEST_FILE, WEIGHTS_FILE, ArtifactCorrupt, Classifier, load_artifact,
                               pretrained_fingerprint, write_artifact)
from workers.base_model import BaseStart, base_predictions, class_changes, compare, trained_ids
from workers.evaluation import EVALUATION_FILE, VALIDATION, evaluation_files, held_out_summary, read_evaluation
from workers.batch_predict import run_batch_prediction
from workers.backbone_registry import use_registry
from workers.backbones import (DEFAULT_BACKBONE, BackboneSpec, UnknownBackbone, WeightsMismatch, WeightsUnavailable,
                               get_backbone)
from workers.checkpoints import prune_checkpoints, read_checkpoint, remove_checkpoint, write_checkpoint
from workers.config import TrainConfig
from workers.data import DecodedCache, prepare_data
from workers.errors import JobError, StopJob
from workers.device import resolve_device
from workers.progress import ProgressTracker
from workers.training import train
from workers.decoded_cache import SCRATCH
from workers.training.probe import REUSED_FEATURES

log = logging.getLogger("graft.worker")


def load_training_data(db: Database, blobs: BlobStore, dataset_id: str, config: TrainConfig, pre,
                       control, cache: DecodedCache | None = None, project_id: str = ""):
    """A job's dataset from the store, decoded and split (workers.data.prepare_data)."""
    with db.session() as s:
        dataset = images_for_training(s, dataset_id)
    if dataset is None:
        raise JobError("dataset_missing", f"dataset {dataset_id} no longer exists")
    pool = list(dataset.unlabeled) if config.strategy == "auto" and config.unlabeled != "ignore" else []  # issue 16
    read = blobs.reader([image.sha256 for image in dataset.images] + pool)  # an object store: prefetched in parallel
    return prepare_data(dataset, read, config, pre, control, cache, owner=project_id)


class LeaseControl:
    """Keeps the lease alive from a background thread and tells the training loop when to stop.

    The thread checks for a cancel every `cancel_poll_s` (a cheap read) and renews the lease every
    heartbeat interval; on shutdown the job may run on for the grace period, then stops at its
    next step so it can be handed back.
    """

    PROGRESS_EVERY_S = 1.0

    def __init__(self, worker: "Worker", claim: Claim):
        self.worker, self.queue, self.claim = worker, worker.queue, claim
        self.settings = worker.settings
        self.stop_reason: str | None = None
        # The job's progress and which updates are events; a training job's phases run on its backbone.
        backbone = claim.config.get("backbone") or (DEFAULT_BACKBONE if claim.kind == JobKind.train else None)
        self._tracker = ProgressTracker(backbone=backbone)
        self._last_write = 0.0
        self._last_checkpoint: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self) -> "LeaseControl":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def _beat(self) -> None:
        poll = min(self.settings.cancel_poll_s, self.settings.heartbeat_interval_s)
        last_beat = time.monotonic()
        while not self._done.wait(poll):
            try:
                if time.monotonic() - last_beat >= self.settings.heartbeat_interval_s:
                    last_beat = time.monotonic()
                    state = self.queue.heartbeat(self.claim)
                    self.queue.worker_alive(self.worker.worker_id, self.claim.job_id)
                else:
                    state = self.queue.lease_state(self.claim)
            except Exception:  # a database blip: keep trying until the lease runs out
                log.warning("heartbeat failed", exc_info=True, extra={"action": "heartbeat"})
                continue
            if state != "ok":
                self.stop_reason = state  # "cancel" or "lost"

    def stop_if_asked(self) -> None:
        if self.stop_reason:
            raise StopJob(self.stop_reason)
        if self.worker.drain_deadline is not None and time.monotonic() >= self.worker.drain_deadline:
            raise StopJob("shutdown")

    def save_checkpoint(self, epoch: int, state: dict | Callable[[], dict]) -> None:
        """Training loops call this at each epoch end; a retry of the job resumes from it.
        Saved at most every `checkpoint_interval_s`: short epochs should not pay for a write each.
        `state` may be a function, called only when a checkpoint is written. An object store that
        cannot be reached costs this checkpoint, not the job: the next one is tried at the next epoch."""
        now = time.monotonic()
        if self._last_checkpoint is not None and now - self._last_checkpoint < self.settings.checkpoint_interval_s:
            return
        try:
            relative = write_checkpoint(self.settings, self.claim.job_id, self.claim.lease_token, epoch,
                                        state() if callable(state) else state)
        except StorageUnavailable as exc:
            log.warning("checkpoint of job %s at %d not stored: %s", self.claim.job_id, epoch, exc.detail,
                        extra={"action": "checkpoint_skipped"})
            return
        self._last_checkpoint = now
        if self.queue.record_checkpoint(self.claim, epoch, relative):
            prune_checkpoints(self.settings, self.claim.job_id, keep=relative)
        else:
            remove_checkpoint(self.settings, relative)
            self.stop_reason = self.stop_reason or "lost"

    def resume_state(self) -> dict | None:
        """The last checkpoint of an earlier attempt of this job, if there is one."""
        if not self.claim.checkpoint_file:
            return None
        return read_checkpoint(self.settings, self.claim.checkpoint_file)

    def progress(self, update: dict) -> None:
        """Fold the update into the job's progress (workers/progress.py: the shape, rate, ETA, which
        updates are events); the row is written at most every PROGRESS_EVERY_S, and with each event."""
        events = self._tracker.update(update)
        now = time.monotonic()
        if events or now - self._last_write >= self.PROGRESS_EVERY_S:
            self._last_write = now
            if not self.queue.report_progress(self.claim, self._tracker.progress, events):
                self.stop_reason = self.stop_reason or "lost"


class Worker:
    _waiter: JobWaiter | None = None  # while run() runs: what it waits on between claims

    def __init__(self, settings: Settings, worker_id: str | None = None):
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.db = Database(settings.database_url)
        self.queue = JobQueue(self.db, stale_after_s=settings.stale_after_s,
                              retry_backoff_s=settings.retry_backoff_s)
        self.blobs = BlobStore.for_settings(settings)
        self.device = resolve_device(settings.worker_device)
        self.shutdown = threading.Event()
        self.drain_deadline: float | None = None  # set on SIGTERM: when the current job must stop
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        memory = settings.worker_memory_mb * 2**20  # what this worker holds of jobs' data (issue 22)
        self.decoded = DecodedCache(settings.decoded_cache_dir, settings.decoded_cache_mb * 2**20, memory_bytes=memory)
        REUSED_FEATURES.max_bytes = min(256 * 2**20, memory // 4)
        SCRATCH.configure(memory // 4, settings.decoded_cache_dir)  # fine_tune_top's activations past it
        use_registry(settings.backbone_registry_file)  # the operator's extra backbones on this machine
        self._pretrained: dict[str, torch.nn.Module] = {}  # pristine backbones (by weights_key), copied for each job
        if self.device.type == "cuda" and settings.warm_up_worker:
            self.warm_up()

    def pretrained_features(self, spec: BackboneSpec) -> torch.nn.Module:
        """A fresh copy of the backbone's pretrained features: read from disk once per worker."""
        if spec.weights_key not in self._pretrained:
            pristine = spec.build_features(pretrained=True, allow_downloads=self.settings.allow_downloads)
            pretrained_fingerprint(spec.name, pristine)  # what write_artifact compares a trained backbone with
            self._pretrained[spec.weights_key] = pristine
        return copy.deepcopy(self._pretrained[spec.weights_key])

    def warm_up(self) -> None:
        """Initialise CUDA, cuDNN, cuBLAS and the fused optimizer with one training step and one
        inference batch of the default backbone, so the first job starts at full speed."""
        spec = get_backbone(DEFAULT_BACKBONE)
        try:
            features = self.pretrained_features(spec)
        except WeightsUnavailable:
            return
        started = time.perf_counter()
        model = Classifier(features, spec.feature_dim, 2).to(self.device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        side = spec.preprocessing.input_size
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(torch.randn(32, 3, side, side, device=self.device)
                         .contiguous(memory_format=torch.channels_last)).float().logsumexp(1).mean()
        loss.backward()
        opt.step()
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model.eval()(torch.randn(256, 3, side, side, device=self.device).contiguous(memory_format=torch.channels_last))
        torch.cuda.synchronize(self.device)
        del model, opt
        torch.cuda.empty_cache()
        log.info("warmed up %s in %.2f s", self.device, time.perf_counter() - started,
                 extra={"action": "worker_warm_up"})

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.request_shutdown())

    def request_shutdown(self) -> None:
        """First call: stop claiming and let the current job run for the grace period. Second: stop now."""
        if self.shutdown.is_set():
            self.drain_deadline = time.monotonic()
        else:
            self.drain_deadline = time.monotonic() + self.settings.shutdown_grace_s
            self.shutdown.set()
            if (waiter := self._waiter) is not None:
                waiter.interrupt()  # an idle worker stops waiting for a job now

    def run(self, max_jobs: int | None = None) -> None:
        self.queue.register_worker(self.worker_id, socket.gethostname(), os.getpid(), str(self.device))
        log.info("worker %s started on %s", self.worker_id, self.device, extra={"action": "worker_start"})
        has_gpu = self.device.type == "cuda"
        # Listen before the first claim, so that a job committed in between wakes this worker.
        self._waiter = waiter = JobWaiter(self.db, reconnect_s=self.settings.listen_retry_s)
        done, last_reap = 0, 0.0
        try:
            while not self.shutdown.is_set() and (max_jobs is None or done < max_jobs):
                if time.monotonic() - last_reap >= self.settings.heartbeat_interval_s:
                    last_reap = time.monotonic()
                    self.queue.worker_alive(self.worker_id, None)
                    for job_id in self.queue.requeue_stale():
                        log.warning("re-queued stalled job %s", job_id, extra={"action": "requeue_stale"})
                claim = self.queue.claim(self.worker_id, has_gpu=has_gpu)
                if claim is None:
                    waiter.wait(self._idle_timeout(last_reap, has_gpu))
                    continue
                self.run_job(claim)
                done += 1
        finally:
            self._waiter = None
            waiter.close()
            self.queue.worker_stopped(self.worker_id)
            self.db.dispose()
            log.info("worker %s stopped", self.worker_id, extra={"action": "worker_stop"})

    def _idle_timeout(self, last_reap: float, has_gpu: bool) -> float:
        """How long an idle worker waits when no wake-up comes: the poll interval, but no longer
        than until its next heartbeat or the end of a retry's backoff, which nobody notifies."""
        timeout = min(self.settings.poll_interval_s,
                      self.settings.heartbeat_interval_s - (time.monotonic() - last_reap))
        if (due := self.queue.next_run_after(has_gpu=has_gpu)) is not None:
            timeout = min(timeout, (due - self.queue.now()).total_seconds())
        return max(0.0, timeout)

    def run_job(self, claim: Claim) -> None:
        log.info("running job %s (attempt %d)", claim.job_id, claim.attempt, extra={"action": "job_start"})
        with LeaseControl(self, claim) as control:
            try:
                if claim.kind == JobKind.batch_predict:
                    run_batch_prediction(self, claim, control)
                else:
                    self._train_and_publish(claim, control)
            except StopJob as stop:
                self._stopped(claim, stop.reason)
            except JobError as err:
                self._fail(claim, err.code, err.message, retryable=False)
            except StorageUnavailable as exc:  # not the user's fault, nor the job's: it runs again later
                log.warning("job %s waits for the object store: %s", claim.job_id, exc.detail,
                            extra={"action": "storage_defer"})
                self.queue.defer(claim, "storage_unavailable", exc.detail, exc.retry_after_s)
            except (torch.cuda.OutOfMemoryError, MemoryError):
                self._fail(claim, "out_of_memory", "the worker ran out of memory; try a smaller "
                           "batch_size or image_size", retryable=True)
            except Exception as exc:
                log.exception("job %s crashed", claim.job_id, extra={"action": "job_error"})
                self._fail(claim, "internal_error", f"{type(exc).__name__}: {exc}", retryable=True)
            finally:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # a cancelled or failed job leaves the GPU free

    def _training_data(self, claim: Claim, config: TrainConfig, spec: BackboneSpec, control: LeaseControl):
        pre = spec.preprocessing.at_size(config.image_size or spec.preprocessing.input_size)
        return load_training_data(self.db, self.blobs, claim.dataset_id, config, pre, control, self.decoded,
                                  project_id=claim.project_id)

    def _fail(self, claim: Claim, code: str, message: str, *, retryable: bool) -> None:
        if self.queue.fail(claim, code, message, retryable=retryable) == "failed":
            prune_checkpoints(self.settings, claim.job_id, keep=None)  # no retry will resume

    def _stopped(self, claim: Claim, reason: str) -> None:
        if reason == "cancel":
            if self.queue.finish_cancelled(claim):
                prune_checkpoints(self.settings, claim.job_id, keep=None)
        elif reason == "shutdown":
            self.queue.release(claim)
        log.info("job %s stopped: %s", claim.job_id, reason, extra={"action": "job_stop"})

    def _train_and_publish(self, claim: Claim, control: LeaseControl) -> None:
        try:  # the API accepted it, but this machine may not know its backbone (registered elsewhere, or removed)
            config = TrainConfig.model_validate(claim.config)
            spec = get_backbone(config.backbone or DEFAULT_BACKBONE)
        except (ValidationError, UnknownBackbone) as exc:
            why = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
            raise JobError("invalid_config", f"this worker cannot run the job: {why}; register the backbone on "
                           "every worker (`graft backbones add`) or choose one from GET /v1/backbones") from None
        base = None
        try:
            base = self._base_start(claim, config) if config.base_model_id else None
            features = base.features() if base is not None else self.pretrained_features(spec)
        except WeightsUnavailable as exc:  # missing, or not the file recorded (sha256): retrying will not help
            raise JobError("weights_mismatch" if isinstance(exc, WeightsMismatch) else "weights_missing",
                           str(exc)) from None
        data = self._training_data(claim, config, spec, control)
        if config.backbone is None:  # auto may choose another backbone: the same images, decoded for it
            data.at_backbone = lambda name: (self._training_data(claim, config, get_backbone(name), control),
                                             self.pretrained_features(get_backbone(name)))
        head: dict = {}  # how a base model's head seeded the new one (explicit recipes that train a head)
        result = train(config, data, features, spec.feature_dim, control, self.device,
                       init_head=(lambda c: head.update(base.seed_head(c, data.classes))) if base else None)
        control.stop_if_asked()
        spec = get_backbone(result.recipe["backbone"])
        pre = result.preprocessing or data.preprocessing
        model_id = uuid.uuid4().hex
        metrics = {**result.metrics, "history": result.history, "device": str(self.device)}
        extra = evaluation_files(result, data)  # the held-out predictions per image (issue 19)
        if extra:
            metrics["held_out"] = held_out_summary(extra)
        if base is not None:
            metrics["base_model"] = self._compare_with_base(base, data, result, extra, head, control)
        manifest = {"model_id": model_id, "job_id": claim.job_id, "dataset_id": claim.dataset_id,
                    "backbone": spec.name, "classes": data.classes, "task": "multi_label" if data.multi_label else "single_label",
                    "preprocessing": pre.to_dict(),
                    "recipe": result.recipe, "metrics": metrics, "created_at": utcnow().isoformat()}
        path, digest, size = write_artifact(self.settings.models_dir, model_id, result.classifier, manifest, extra)
        model = ModelRecord(id=model_id, backbone=spec.name, classes=data.classes, metrics=metrics,
                            recipe=result.recipe, artifact_dir=self.settings.relative_to_data(path), sha256=digest,
                            size_bytes=size)
        storage = store_for(self.settings)
        try:
            storage.commit_tree(model.artifact_dir)  # an object store: uploaded before the row points at it
        except StorageUnavailable:
            shutil.rmtree(path, ignore_errors=True)
            raise
        if not self.queue.publish(claim, model):
            shutil.rmtree(path, ignore_errors=True)  # another worker owns the job now
            storage.delete_prefix(model.artifact_dir)
            log.warning("lease lost before publishing job %s", claim.job_id, extra={"action": "publish_lost"})
            return
        prune_checkpoints(self.settings, claim.job_id, keep=None)
        log.info("job %s succeeded: model %s, val_accuracy %.4f", claim.job_id, model_id,
                 metrics["val_accuracy"], extra={"action": "job_done"})

    # -- training on from a model (issue 19) -----------------------------------------------------

    def _base_start(self, claim: Claim, config: TrainConfig) -> BaseStart:
        """The model a base_model_id job starts from, looked up again (it may have gone since the job
        was queued), with the images it trained on."""
        with self.db.session() as s:
            row = s.get(Model, config.base_model_id)
            if row is None or row.project_id != claim.project_id:
                raise JobError("base_model_missing", f"base model {config.base_model_id} no longer exists")
            dataset = images_for_training(s, row.dataset_id)
            model_id, artifact_dir, sha, metrics = row.id, row.artifact_dir, row.sha256, dict(row.metrics or {})
        storage = store_for(self.settings)
        try:
            folder = storage.fetch_files(artifact_dir, (WEIGHTS_FILE, MANIFEST_FILE))
            loaded = load_artifact(folder, sha, allow_downloads=self.settings.allow_downloads)
        except (ArtifactCorrupt, FileNotFoundError):
            raise JobError("base_model_unusable", f"base model {model_id}'s stored file is missing or failed its "
                           "sha256 check; train without base_model_id") from None
        if loaded.manifest["backbone"] != config.backbone:
            raise JobError("base_model_backbone", f"base model {model_id} is a {loaded.manifest['backbone']} model; "
                           f"this job's backbone is {config.backbone}")
        held = None
        try:
            document = read_evaluation(storage.fetch(f"{artifact_dir}/{EVALUATION_FILE}").read_bytes())
            held = {r["image_id"] for r in document["rows"] if r["subset"] == VALIDATION}
        except (FileNotFoundError, ValueError):
            pass  # a model from before held-out predictions were kept
        images = [(i.sha256, i.split) for i in dataset.images] if dataset is not None else []
        return BaseStart(model_id, loaded, trained_ids(images, held, (metrics.get("trained_on") or {}).get("splits")))

    def _compare_with_base(self, base: BaseStart, data, result, extra: dict, head: dict, control) -> dict:
        """metrics.base_model: the classes carried over, how the head started, and the base against the
        new model on the new model's held-out images."""
        out = {"id": base.model_id, **class_changes(base.classes, data.classes),
               "head": head or {"note": "fitted afresh: a logistic-regression head (solver lbfgs) or auto's "
                                        "search starts from the base model's backbone only"}}
        if not extra:
            return out
        rows = [r for r in read_evaluation(extra[EVALUATION_FILE])["rows"] if r["subset"] == VALIDATION]
        control.progress({"phase": "comparing with the base model", "images": len(rows)})
        positions, n_train = result.held_out.rows.tolist(), len(data.train_y)

        def squares(start: int, stop: int) -> torch.Tensor:
            return torch.stack([data.train_x[p] if p < n_train else data.val_x[p - n_train]
                                for p in positions[start:stop]])

        labels = base_predictions(base, [r["image_id"] for r in rows], squares, data.preprocessing,
                                  self.blobs.read, torch.device("cpu"))
        out["compared_on"] = {"predictions": result.held_out.predictions, **compare(base, rows, labels)}
        return out
