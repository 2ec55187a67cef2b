"""Batch predictions on a worker: a model's top-k for every image of a dataset, as results.jsonl
and results.csv.

It predicts with the serving path itself (service.serving.model_cache.predict on an
InferenceEngine on the worker's device: traced and frozen on a CPU, bf16 autocast on a GPU), so
each line says what /predict answers for that image. The images go in steps; after each step its
lines are appended and flushed, and a checkpoint (at most every checkpoint_interval_s) records how
many images are done and how many bytes of each file hold them. Each attempt writes files of its
own, named by its lease: a retry copies the checkpointed prefix of the last attempt's files and
goes on after it, so the output holds every image exactly once, in order, wherever an attempt
was killed (and a stale attempt that lives on writes only its own files). The files are renamed
into place just before the job is marked succeeded.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from service.errors import InvalidInput
from service.serving.engine import InferenceEngine
from service.serving.model_cache import predict
from service.settings import Settings
from service.store.objects import store_for
from service.store.tables import DatasetImage, Model
from workers.artifacts import MANIFEST_FILE, WEIGHTS_FILE, ArtifactCorrupt, LoadedModel, load_artifact
from workers.backbones import WeightsUnavailable
from workers.checkpoints import prune_checkpoints
from workers.errors import JobError, StopJob

if TYPE_CHECKING:
    from service.store.queue import Claim
    from workers.worker import LeaseControl, Worker

log = logging.getLogger("graft.batch_predict")

FORMATS = ("csv", "jsonl")
MIN_STEP = 64  # images per step by default: enough to fill a CPU engine's passes between checks


def results_path(settings: Settings, job_id: str, fmt: str) -> Path:
    """Where a finished batch prediction's results lie (fmt: "csv" or "jsonl")."""
    return settings.batch_results_dir / job_id / f"results.{fmt}"


def csv_header(top_k: int) -> list[str]:
    return ["image", "sha256", *(f"{what}_{i}" for i in range(1, top_k + 1) for what in ("label", "score"))]


def images_to_predict(session, dataset_id: str) -> list[tuple[str, str]]:
    """(name, sha256) of the dataset's images in upload order: the order of the results."""
    return [tuple(row) for row in session.execute(
        select(DatasetImage.original_name, DatasetImage.sha256)
        .where(DatasetImage.dataset_id == dataset_id).order_by(DatasetImage.id))]


def run_batch_prediction(worker: Worker, claim: Claim, control: LeaseControl) -> None:
    """Predict the claim's dataset with its model and mark the job succeeded (raises StopJob, JobError)."""
    settings = worker.settings
    with worker.db.session() as s:
        row = s.get(Model, claim.source_model_id)
        images = images_to_predict(s, claim.dataset_id)
    if row is None:
        raise JobError("model_missing", f"model {claim.source_model_id} no longer exists")
    model = _load_model(settings, row)
    top_k = min(int(claim.config.get("top_k", 5)), len(model.classes))
    out = ResultFiles(settings, claim, top_k, control.resume_state())
    if out.done:
        worker.queue.report_progress(claim, _progress(out.done, len(images)),
                                     {"kind": "resumed", "done": out.done})
    engine = InferenceEngine(str(worker.device), settings.predict_max_batch, settings.predict_batch_window_ms,
                             settings.torch_threads, parallel=settings.predict_parallel).start()
    step = step_size(settings, engine)
    steps = [images[i:i + step] for i in range(out.done, len(images), step)]
    started, first = time.monotonic(), out.done
    try:
        with closing(_predicted_steps(engine, model, worker, steps, top_k)) as predicted:
            for batch, results in zip(steps, predicted):
                out.append(batch, results)
                rate = (out.done - first) / max(time.monotonic() - started, 1e-9)
                control.progress({**_progress(out.done, len(images)), "images_per_s": round(rate, 1)})
                control.save_checkpoint(out.done, out.checkpoint)  # called (files uploaded) only when saved
                control.stop_if_asked()
    except BaseException as exc:
        out.close()
        if isinstance(exc, JobError) or (isinstance(exc, StopJob) and exc.reason == "cancel"):
            out.remove()  # no retry will resume, nobody can download them
        raise
    finally:
        engine.stop()
    out.publish()
    if worker.queue.finish_batch(claim, _progress(out.done, len(images))):
        prune_checkpoints(settings, claim.job_id, keep=None)
        log.info("batch prediction %s succeeded: %d images", claim.job_id, out.done, extra={"action": "job_done"})
    else:
        log.warning("lease lost before finishing batch prediction %s", claim.job_id,
                    extra={"action": "publish_lost"})


def step_size(settings: Settings, engine: InferenceEngine) -> int:
    """Images per step: the setting, else the engine's batch but at least MIN_STEP."""
    return settings.batch_predict_step or max(MIN_STEP, engine.max_batch)


def _progress(done: int, total: int) -> dict:
    return {"phase": "predicting" if done < total else "done", "done": done, "total": total}


def _load_model(settings: Settings, row: Model) -> LoadedModel:
    try:
        folder = store_for(settings).fetch_files(row.artifact_dir, (WEIGHTS_FILE, MANIFEST_FILE))
        return load_artifact(folder, row.sha256, allow_downloads=settings.allow_downloads)
    except (ArtifactCorrupt, WeightsUnavailable) as exc:
        raise JobError("model_unusable", f"model {row.id} cannot be loaded: {exc}") from None
    except FileNotFoundError:
        raise JobError("model_unusable", f"model {row.id}'s stored file is missing; retrain it") from None


def _predicted_steps(engine: InferenceEngine, model: LoadedModel, worker: Worker, steps: list[list],
                     top_k: int) -> Iterator[list[dict]]:
    """Each step's predictions, in order, with the next steps already reading and predicting (one
    per engine thread and one more), so the engine never waits for the files between steps."""
    ahead = engine.parallel + 1
    pool = ThreadPoolExecutor(ahead, thread_name_prefix="graft-batch")
    pending: deque[Future] = deque()
    try:
        for batch in steps:
            pending.append(pool.submit(_predict_step, engine, model, worker, batch, top_k))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _predict_step(engine: InferenceEngine, model: LoadedModel, worker: Worker, batch: list[tuple[str, str]],
                  top_k: int) -> list[dict]:
    files = [(name, worker.blobs.read(sha)) for name, sha in batch]
    try:
        return predict(engine, model, files, top_k)
    except InvalidInput as exc:  # every image was checked at upload; this one changed or is new to the decoder
        raise JobError("image_unusable", str(exc)) from None


class ResultFiles:
    """This attempt's results.jsonl and results.csv, appended step by step, resumed from a checkpoint."""

    def __init__(self, settings: Settings, claim: Claim, top_k: int, resume: dict | None):
        self.settings, self.top_k = settings, top_k
        self.folder = settings.batch_results_dir / claim.job_id
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths = {fmt: self.folder / f".{claim.lease_token}.{fmt}" for fmt in FORMATS}
        self.done = 0
        self.files = {fmt: open(path, "wb") for fmt, path in self.paths.items()}
        if resume and self._copy_prefix(resume):
            self.done = int(resume["done"])
        else:
            for f in self.files.values():
                f.seek(0)
                f.truncate()
            self._write_csv_row(csv_header(top_k))

    def _copy_prefix(self, state: dict) -> bool:
        """The checkpointed bytes of the previous attempt's files (False: they are gone; start over)."""
        try:
            for fmt, f in self.files.items():
                with open(store_for(self.settings).fetch(state[fmt]), "rb") as old:  # from another machine, too
                    prefix = old.read(state[f"{fmt}_bytes"])
                if len(prefix) != state[f"{fmt}_bytes"]:
                    return False
                f.write(prefix)
        except (OSError, KeyError):
            return False
        return True

    def append(self, batch: list[tuple[str, str]], results: list[dict]) -> None:
        lines = []
        for (name, sha), result in zip(batch, results):
            preds = result["predictions"]
            # Issue 17: label (None when unknown) and unknown, as /predict answers them.
            lines.append(json.dumps({"image": name, "sha256": sha, "label": result.get("label"),
                                     "unknown": result.get("unknown", False), "predictions": preds}) + "\n")
            self._write_csv_row([name, sha, *(v for p in preds for v in (p["label"], p["score"]))])
        self.files["jsonl"].write("".join(lines).encode())
        for f in self.files.values():
            f.flush()  # what the checkpoint counts must be in the file, not in this process
        self.done += len(batch)

    def _write_csv_row(self, row: list) -> None:
        text = io.StringIO()
        csv.writer(text).writerow(row)
        self.files["csv"].write(text.getvalue().encode())

    def checkpoint(self, commit: bool = True) -> dict:
        """How far this attempt got: the images done and the bytes of each file that hold them; the
        files are committed to the store (uploaded, with an object store) so any worker can resume."""
        for f in self.files.values():
            os.fsync(f.fileno())  # a checkpoint must never count bytes a crash could lose
        state = {"done": self.done}
        for fmt, f in self.files.items():
            state[fmt], state[f"{fmt}_bytes"] = self.settings.relative_to_data(self.paths[fmt]), f.tell()
            if commit:
                store_for(self.settings).commit(state[fmt])
        return state

    def remove(self) -> None:
        """Every file of this job's results, every attempt's (best effort)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            store_for(self.settings).delete_prefix(self.settings.relative_to_data(self.folder))
        except Exception:
            log.warning("could not remove batch results of %s", self.folder.name, exc_info=True)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def publish(self) -> None:
        """Rename this attempt's files into place and commit them; earlier attempts' files go."""
        self.checkpoint(commit=False)
        self.close()
        storage = store_for(self.settings)
        for fmt, path in self.paths.items():
            final = results_path(self.settings, self.folder.name, fmt)
            os.replace(path, final)
            storage.commit(self.settings.relative_to_data(final))
        for key in storage.keys(self.settings.relative_to_data(self.folder)):
            if Path(key).name.startswith("."):
                storage.delete(key)
        for stale in self.folder.glob(".*"):
            stale.unlink(missing_ok=True)
