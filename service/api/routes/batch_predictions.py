"""Batch predictions: a model's top-k for every image of a dataset or an uploaded zip, run on a
worker as a job of kind batch_predict (queue, progress, cancel, retries and leases as training's),
downloaded as CSV or JSONL once it has succeeded.

An uploaded zip becomes an unlabeled dataset of the project (frozen, never trainable): the job
row needs a dataset, the images then count toward the storage quota and go with the project like
any other, and the same images can be predicted again with another model by dataset_id.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from service.api import quotas
from service.api.auth import PredictCaller
from service.api.deps import BlobsDep, DatabaseDep, RateLimiterDep, SessionDep, SettingsDep
from service.api.downloads import file_while_key_valid
from service.api.routes._multipart import MULTIPART
from service.api.schemas import (
    BatchLinks,
    BatchPredictionCreate,
    BatchPredictionOut,
    BatchProgress,
    JobError,
)
from service.datasets import catalog
from service.datasets.ingest import ingest_unlabeled_zip
from service.datasets.names import clean_filename
from service.enums import TERMINAL, JobKind, JobStatus
from service.errors import Conflict, InvalidInput, NotFound, UnsupportedMediaType
from service.store.queue import JobQueue
from service.store.tables import Dataset, Job, Model
from service.store.objects import store_for
from workers.batch_predict import results_path

router = APIRouter(tags=["batch predictions"])

MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": BatchPredictionCreate.model_json_schema()},
    MULTIPART: {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a zip of images, in any folders"},
        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5}}}}}}}


@dataclass
class BatchSource:
    options: BatchPredictionCreate
    upload: UploadFile | None  # the zip, when the images are sent rather than named


async def batch_source(request: Request) -> AsyncIterator[BatchSource]:
    """The request body: JSON naming a dataset, or multipart with the zip in `file`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput("the body is not valid JSON; send {\"dataset_id\": ..., \"top_k\": ...}") from None
        yield BatchSource(_options(body), None)
        return
    if not content_type.startswith(MULTIPART):
        raise UnsupportedMediaType("send application/json with a dataset_id, or multipart/form-data with a "
                                   "zip of images in a part named 'file'", headers={"Accept": f"application/json, {MULTIPART}"})
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("multipart uploads need the zip of images in a part named 'file'")
        yield BatchSource(_options({k: v for k, v in form.items() if k != "file"}), upload)


def _options(body: object) -> BatchPredictionCreate:
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object: {\"dataset_id\": ..., \"top_k\": ...}")
    try:
        return BatchPredictionCreate.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"invalid batch prediction: {problems}") from None


SourceDep = Annotated[BatchSource, Depends(batch_source)]


def model_to_predict_with(model_id: str, caller: PredictCaller, session: SessionDep) -> Model:
    """The ready model, checked before the body is read: no key is a 401, another project's model a
    404, whatever the body holds."""
    caller.require_any_model()  # a key limited to aliases predicts only through them
    return catalog.ready_model(session, model_id, caller.project_id)


@router.post("/v1/models/{model_id}/batch-predictions", status_code=202, openapi_extra=_BODY_DOC)
def create_batch_prediction(model: Annotated[Model, Depends(model_to_predict_with)], source: SourceDep,
                            caller: PredictCaller, session: SessionDep, settings: SettingsDep, blobs: BlobsDep,
                            limiter: RateLimiterDep) -> BatchPredictionOut:
    """Queue a batch prediction with a model (or a succeeded job's id) over a dataset or an uploaded zip."""
    quotas.check_new_job(session, settings, caller.project_id)
    if source.upload is not None and source.options.dataset_id is not None:
        raise InvalidInput("send either a dataset_id or a zip of images, not both")
    if source.upload is not None:
        dataset = _dataset_from_zip(source.upload, caller.project_id, session, settings, blobs, limiter)
    elif source.options.dataset_id is not None:
        dataset = _dataset_to_predict(source.options.dataset_id, caller.project_id, session)
    else:
        raise InvalidInput("say what to predict: a dataset_id (JSON), or a zip of images (multipart 'file')")
    job = JobQueue.enqueue(session, project_id=caller.project_id, dataset_id=dataset.id,
                           config={"top_k": min(source.options.top_k, len(model.classes))},
                           max_attempts=settings.max_attempts, kind=JobKind.batch_predict, source_model_id=model.id)
    return batch_out(job, dataset.num_images)


def _dataset_to_predict(dataset_id: str, project_id: str, session) -> Dataset:
    """A dataset of the project, frozen so the job predicts exactly the images it has now."""
    dataset = catalog.get_or_404(session, Dataset, dataset_id, "dataset", project_id)
    session.refresh(dataset, with_for_update=True)
    if not dataset.num_images:
        raise InvalidInput(f"dataset {dataset_id} has no images to predict")
    dataset.frozen = True
    return dataset


def _dataset_from_zip(upload: UploadFile, project_id: str, session, settings, blobs, limiter) -> Dataset:
    """The zip's images, checked as any upload's, stored as an unlabeled, frozen dataset (422 when none is usable)."""
    limiter.hit(project_id, "upload", quotas.quota(session, settings, project_id, "upload_rate_per_minute"))
    quotas.check_new_dataset(session, settings, project_id)
    with blobs.staging(settings.tmp_dir) as stage:
        result = ingest_unlabeled_zip(upload.file, stage, settings)
        quotas.check_storage(session, settings, project_id, sum(i.size_bytes for i in result.images))
        name = "batch: " + (clean_filename(upload.filename, "images").removesuffix(".zip")[:190] or "images")
        dataset = catalog.create_dataset(session, name, result, settings, project_id)
        dataset.frozen = True
        stage.commit(img.sha256 for img in result.images)
    return dataset


@router.get("/v1/batch-predictions/{batch_id}")
def get_batch_prediction(batch_id: str, caller: PredictCaller, session: SessionDep) -> BatchPredictionOut:
    """Status, progress (done/total) and links to the results."""
    job = _batch_or_404(session, batch_id, caller.project_id)
    return batch_out(job, session.get(Dataset, job.dataset_id).num_images)


@router.delete("/v1/batch-predictions/{batch_id}", status_code=202)
def cancel_batch_prediction(batch_id: str, caller: PredictCaller, session: SessionDep) -> BatchPredictionOut:
    """Cancel: a queued batch at once, a running one after its current step (as POST /v1/jobs/{id}/cancel)."""
    job = _batch_or_404(session, batch_id, caller.project_id)
    if job.status in TERMINAL:
        raise Conflict(f"batch prediction {batch_id} has already {job.status}; only queued or running ones "
                       "can be cancelled")
    JobQueue.request_cancel(session, job)
    session.flush()
    return batch_out(job, session.get(Dataset, job.dataset_id).num_images)


@router.get("/v1/batch-predictions/{batch_id}/results.{fmt}",
            responses={200: {"content": {MEDIA_TYPES["csv"]: {}, MEDIA_TYPES["jsonl"]: {}}}})
def download_results(batch_id: str, fmt: str, caller: PredictCaller, session: SessionDep, db: DatabaseDep,
                     settings: SettingsDep) -> StreamingResponse:
    """The results, one row per image in order (image, sha256, top-k labels and scores); 409 until it has succeeded."""
    if fmt not in MEDIA_TYPES:
        raise NotFound(f"no results.{fmt[:20]}; results come as results.csv or results.jsonl")
    job = _batch_or_404(session, batch_id, caller.project_id)
    if job.status != JobStatus.succeeded:
        raise Conflict(f"batch prediction {batch_id} is {job.status}; its results are ready once it has "
                       "succeeded", job_status=job.status)
    try:  # from the object store into this machine's cache, checked against its sha256
        path = store_for(settings).fetch(settings.relative_to_data(results_path(settings, job.id, fmt)))
    except FileNotFoundError:
        raise Conflict(f"batch prediction {batch_id}'s results are missing from the store; run it again") from None
    return file_while_key_valid(path, db, caller, MEDIA_TYPES[fmt], f"{job.id}.{fmt}")  # ends if the key is revoked


def _batch_or_404(session, batch_id: str, project_id: str) -> Job:
    job = catalog.job_or_404(session, batch_id, project_id)
    if job.kind != JobKind.batch_predict:
        raise NotFound(f"no batch prediction with id {batch_id!r} (it is a training job: see /v1/jobs/{batch_id})")
    return job


def batch_out(job: Job, total: int) -> BatchPredictionOut:
    base = f"/v1/batch-predictions/{job.id}"
    error = (JobError(code=job.error_code, message=job.error_message or "")
             if job.error_code and job.status in (JobStatus.failed, JobStatus.queued) else None)
    return BatchPredictionOut(
        id=job.id, model_id=job.source_model_id, dataset_id=job.dataset_id, status=job.status,
        top_k=job.config["top_k"], progress=BatchProgress(done=(job.progress or {}).get("done", 0), total=total),
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at, attempts=job.attempts,
        cancel_requested=job.cancel_requested, error=error,
        links=BatchLinks(self=base, results_csv=f"{base}/results.csv", results_jsonl=f"{base}/results.jsonl",
                         job=f"/v1/jobs/{job.id}"))
