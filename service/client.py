"""A small typed Python client for Graft's HTTP API (the `graft` CLI is built on it).

    from service.client import GraftClient
    with GraftClient() as graft:                       # GRAFT_URL, GRAFT_API_KEY from the environment
        dataset = graft.upload_dataset("photos/")      # a folder is zipped on the fly
        job = graft.create_job(dataset["id"], strategy="linear_probe")
        for event in graft.watch_job(job["id"]):       # the job's event stream, or polling
            print(event["kind"], event["data"])
        model_id = graft.get_job(job["id"])["model_id"]
        print(graft.predict(model_id, ["bee.jpg"])["results"])
        graft.export_model(model_id, "onnx", "model.zip")

It imports neither torch nor the server, so it starts fast and works on any machine that can
reach the API. Every API error becomes a GraftAPIError carrying the server's problem+json detail.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any, Callable, Iterator, NotRequired, TypedDict
from urllib.parse import quote

import httpx

from service.enums import TERMINAL, ExportFormat

DEFAULT_URL = "http://127.0.0.1:8000"
Progress = Callable[[int, int], None]  # (bytes done, bytes total)


# -- response shapes (the fields of the API's JSON; see /docs for the full schema) -------------
class Rejection(TypedDict):
    path: str
    reason: str


class Dataset(TypedDict):
    id: str
    name: str
    created_at: str
    classes: list[str]
    class_counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    num_images: int
    has_val_split: bool
    rejected: list[Rejection]
    trainable: NotRequired[bool]
    version: NotRequired[int]
    report: NotRequired[dict[str, Any] | None]  # problems, warnings, duplicates, imbalance...


class Job(TypedDict):
    id: str
    dataset_id: str
    status: str
    config: dict[str, Any]
    priority: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    attempts: int
    progress: dict[str, Any]
    model_id: str | None
    error: dict[str, str] | None
    cancel_requested: bool


class Model(TypedDict):
    id: str
    job_id: str
    dataset_id: str
    created_at: str
    backbone: str
    classes: list[str]
    metrics: dict[str, Any]
    recipe: dict[str, Any]
    sha256: str
    size_bytes: int


class Prediction(TypedDict):
    label: str
    score: float


class OodScore(TypedDict):
    kind: str
    score: float
    threshold: float


class PredictResult(TypedDict):
    filename: str
    predictions: list[Prediction]
    label: NotRequired[str | None]  # the top class; None when unknown (issue 17)
    unknown: NotRequired[bool]  # none of the model's classes
    ood: NotRequired[OodScore | None]  # None for models without a stored score


class PredictResponse(TypedDict):
    model_id: str
    results: list[PredictResult]
    alias: NotRequired[str]  # predicted through this alias (model_id: the model it pointed at)


class Alias(TypedDict):
    name: str
    model_id: str
    created_at: str
    updated_at: str


class AliasMove(TypedDict):
    from_model_id: str | None  # None: created by this move
    to_model_id: str | None  # None: deleted
    key_id: str | None
    moved_at: str


class BatchPrediction(TypedDict):
    id: str
    model_id: str
    dataset_id: str
    status: str
    top_k: int
    progress: dict  # {"done", "total"}
    attempts: int
    error: NotRequired[dict | None]
    links: dict  # self, results_csv, results_jsonl, job


class JobEvent(TypedDict):
    """One entry of a job's event log: kind "status" ({"status": ...}), "epoch" ({"epoch", "epochs",
    "train_loss", "val_accuracy", ...}) or "progress" (the job's progress dict, when polling)."""

    id: int | str | None
    kind: str
    data: dict[str, Any]
    created_at: str | None


class GraftAPIError(Exception):
    """The API answered with an error; `detail` is its problem+json explanation."""

    def __init__(self, status: int, detail: str, body: dict | None = None):
        super().__init__(f"{status}: {detail}")
        self.status, self.detail, self.body = status, detail, body or {}


class _ProgressReader:
    """A read-only file that reports how far it has been read (httpx streams uploads through read())."""

    def __init__(self, f: IO[bytes], total: int, callback: Progress):
        self._f, self._total, self._callback = f, total, callback
        self.name = getattr(f, "name", "upload")

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        self._callback(self._f.tell(), self._total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def fileno(self) -> int:
        return self._f.fileno()


def zip_folder(folder: Path, out: IO[bytes], progress: Progress | None = None) -> int:
    """Zip a folder's files (paths relative to it) into `out`; returns the number of files.

    Images are already compressed, so they are stored, not deflated: zipping is I/O-bound.
    The server decides which files are usable and reports the others.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    done = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in files:
            zf.write(path, path.relative_to(folder).as_posix())
            done += path.stat().st_size
            if progress:
                progress(done, total)
    return len(files)


class GraftClient:
    """Graft's API over HTTP. Configured by arguments, or GRAFT_URL and GRAFT_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, poll_interval_s: float = 0.5):
        self.url = (url or os.environ.get("GRAFT_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("GRAFT_API_KEY")
        headers = {"User-Agent": "graft-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.poll_interval_s = poll_interval_s
        # An event stream silent this long is checked against the job and reopened.
        self.stream_idle_s = 20.0
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "GraftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        resp = self._http.request(method, path, **kwargs)
        if resp.is_error:
            raise _api_error(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- service ----------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/healthz")

    def ready(self) -> dict:
        return self._json("GET", "/readyz")

    def backbones(self) -> list[dict]:
        return self._json("GET", "/v1/backbones")

    # -- datasets ---------------------------------------------------------------------------
    def upload_dataset(self, path: str | Path, name: str | None = None, *,
                       zip_progress: Progress | None = None,
                       upload_progress: Progress | None = None) -> Dataset:
        """Upload a zip, or a folder (zipped on the fly into a temporary file)."""
        path = Path(path)
        if path.is_dir():
            with tempfile.TemporaryFile(suffix=".zip") as tmp:
                zip_folder(path, tmp, zip_progress)
                tmp.seek(0)
                return self._upload_zip(tmp, f"{path.resolve().name}.zip", name or path.resolve().name,
                                        upload_progress)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is neither a folder nor a zip file")
        with open(path, "rb") as f:
            return self._upload_zip(f, path.name, name, upload_progress)

    def _upload_zip(self, f: IO[bytes], filename: str, name: str | None, progress: Progress | None) -> Dataset:
        total = os.fstat(f.fileno()).st_size
        body = _ProgressReader(f, total, progress) if progress else f
        data = {"name": name} if name else {}
        return self._json("POST", "/v1/datasets", files={"file": (filename, body, "application/zip")},
                          data=data)

    def list_datasets(self, limit: int = 100) -> list[Dataset]:
        return self._json("GET", "/v1/datasets", params={"limit": limit})

    def get_dataset(self, dataset_id: str) -> Dataset:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    # -- jobs -------------------------------------------------------------------------------
    def create_job(self, dataset_id: str, **options: Any) -> Job:
        """Queue a training job; options are POST /v1/jobs fields (None means the default)."""
        body = {"dataset_id": dataset_id, **{k: v for k, v in options.items() if v is not None}}
        return self._json("POST", "/v1/jobs", json=body)

    def list_jobs(self, status: str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._json("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: str) -> Job:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> Job:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def watch_job(self, job_id: str, timeout_s: float | None = None) -> Iterator[JobEvent]:
        """The job's events until it ends: from GET /v1/jobs/{id}/events as a server-sent event
        stream when the server has it, otherwise synthesized by polling GET /v1/jobs/{id}.

        Ends after the event that reports a terminal status; call get_job() for the final job.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            yield from self._stream_events(job_id, deadline)
        except _NoEventStream:
            yield from self._poll_events(job_id, deadline)

    def _stream_events(self, job_id: str, deadline: float | None) -> Iterator[JobEvent]:
        last_id: str | None = None
        drained = False
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                       timeout=httpx.Timeout(30.0, read=self.stream_idle_s)) as resp:
                    if resp.status_code in (404, 405) and last_id is None:
                        raise _NoEventStream  # an older server; polling reports an unknown job
                    if resp.is_error:
                        resp.read()
                        raise _api_error(resp)
                    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
                        raise _NoEventStream  # an older server answering with something else
                    for event in parse_sse(resp.iter_lines()):
                        last_id = str(event["id"]) if event["id"] is not None else last_id
                        yield event
                        if is_terminal_event(event):
                            return
            except httpx.TransportError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
            # The stream ended without a terminal status (a proxy, a server restart): reconnect
            # and resume after the last event seen. A job that ended meanwhile gets one more
            # connection to deliver its last events, then its final status from the job itself.
            job = self.get_job(job_id)
            if job["status"] in TERMINAL:
                if drained:
                    yield _status_event(job)
                    return
                drained = True
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']}")
            time.sleep(self.poll_interval_s)

    def _poll_events(self, job_id: str, deadline: float | None) -> Iterator[JobEvent]:
        status, epoch, progress = None, None, None
        while True:
            job = self.get_job(job_id)
            if job["progress"] != progress:
                progress = job["progress"]
                if progress.get("epoch") is not None and progress.get("epoch") != epoch \
                        and "val_accuracy" in progress:
                    epoch = progress["epoch"]
                    yield _event("epoch", {k: progress.get(k) for k in
                                           ("epoch", "epochs", "train_loss", "val_loss", "val_accuracy")})
                else:
                    yield _event("progress", dict(progress))
            if job["status"] != status:
                status = job["status"]
                yield _status_event(job)
                if status in TERMINAL:
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status}")
            time.sleep(self.poll_interval_s)

    def wait_job(self, job_id: str, timeout_s: float | None = None) -> Job:
        for _ in self.watch_job(job_id, timeout_s):
            pass
        return self.get_job(job_id)

    # -- models -----------------------------------------------------------------------------
    def list_models(self, limit: int = 100) -> list[Model]:
        return self._json("GET", "/v1/models", params={"limit": limit})

    def get_model(self, model_id: str) -> Model:
        return self._json("GET", f"/v1/models/{model_id}")

    # -- labeling (issue 16) ------------------------------------------------------------------
    def suggestions(self, model_id: str, dataset_id: str | None = None, k: int = 20,
                    strategy: str = "margin") -> dict:
        """The dataset's unlabeled images the model would most like labeled, with its pre-labels."""
        params = {"k": k, "strategy": strategy, **({"dataset_id": dataset_id} if dataset_id else {})}
        return self._json("GET", f"/v1/models/{model_id}/suggestions", params=params)

    def label_images(self, dataset_id: str, labels: dict[str, str | None], create_class: bool = False) -> Dataset:
        """Label images by id (None: unlabeled); the answer is the dataset changed (maybe a new version)."""
        body = {"images": [{"id": i, "label": label} for i, label in labels.items()], "create_class": create_class}
        return self._json("PATCH", f"/v1/datasets/{dataset_id}/images", json=body)

    def predict(self, model_id: str, images: list[str | Path], top_k: int = 5,
                min_score: float | None = None) -> PredictResponse:
        """Predict one or more image files (a job id works once its model is ready); `min_score`:
        unknown below this out-of-distribution score instead of the model's own threshold."""
        return self._predict(f"/v1/models/{model_id}/predict", images, top_k, min_score)

    def predict_alias(self, alias: str, images: list[str | Path], top_k: int = 5) -> PredictResponse:
        """Predict with the model the alias points at; the answer's model_id names it."""
        return self._predict(f"/v1/aliases/{_segment(alias)}/predict", images, top_k)

    def _predict(self, path: str, images: list[str | Path], top_k: int,
                 min_score: float | None = None) -> PredictResponse:
        paths = [Path(p) for p in images]
        files = [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        params = {"top_k": top_k, **({"min_score": min_score} if min_score is not None else {})}
        return self._json("POST", path, params=params, files=files)

    # -- aliases ----------------------------------------------------------------------------
    def promote(self, model_id: str, alias: str) -> Alias:
        """Point the alias at the model (creating the alias); predicts through it switch at once."""
        return self._json("PUT", f"/v1/aliases/{_segment(alias)}", json={"model_id": model_id})

    def list_aliases(self) -> list[Alias]:
        return self._json("GET", "/v1/aliases")

    def alias_history(self, alias: str) -> list[AliasMove]:
        return self._json("GET", f"/v1/aliases/{_segment(alias)}/history")

    def delete_alias(self, alias: str) -> Alias:
        return self._json("DELETE", f"/v1/aliases/{_segment(alias)}")

    def export_model(self, model_id: str, fmt: ExportFormat, dest: str | Path,
                     progress: Progress | None = None) -> Path:
        """Download the model as a zip (model file + manifest.json) to `dest` (a file or a folder)."""
        return self._download(f"/v1/models/{model_id}/export", dest, progress, params={"format": fmt})

    # -- batch predictions ------------------------------------------------------------------
    def create_batch_prediction(self, model_id: str, dataset_id: str | None = None, *,
                                images: str | Path | None = None, top_k: int = 5) -> BatchPrediction:
        """Queue a batch prediction over a dataset of the project, or over `images` (a zip, or a
        folder zipped on the fly); a worker runs it."""
        path = f"/v1/models/{model_id}/batch-predictions"
        if images is None:
            return self._json("POST", path, json={"dataset_id": dataset_id, "top_k": top_k})
        images = Path(images)
        with ExitStack() as stack:
            if images.is_dir():
                f, name = stack.enter_context(tempfile.TemporaryFile(suffix=".zip")), f"{images.resolve().name}.zip"
                zip_folder(images, f)
                f.seek(0)
            else:
                f, name = stack.enter_context(open(images, "rb")), images.name
            return self._json("POST", path, data={"top_k": str(top_k)}, files={"file": (name, f, "application/zip")})

    def get_batch_prediction(self, batch_id: str) -> BatchPrediction:
        return self._json("GET", f"/v1/batch-predictions/{batch_id}")

    def cancel_batch_prediction(self, batch_id: str) -> BatchPrediction:
        return self._json("DELETE", f"/v1/batch-predictions/{batch_id}")

    def wait_batch_prediction(self, batch_id: str, timeout_s: float | None = None,
                              on_progress: Callable[[BatchPrediction], None] | None = None) -> BatchPrediction:
        """Poll until the batch prediction has ended; `on_progress` sees each state."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            batch = self.get_batch_prediction(batch_id)
            if on_progress:
                on_progress(batch)
            if batch["status"] in TERMINAL:
                return batch
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch prediction {batch_id} is still {batch['status']} after {timeout_s}s")
            time.sleep(self.poll_interval_s)

    def download_batch_results(self, batch_id: str, dest: str | Path, fmt: str = "csv",
                               progress: Progress | None = None) -> Path:
        """Save results.csv or results.jsonl (fmt) to `dest` (a file, or a folder)."""
        return self._download(f"/v1/batch-predictions/{batch_id}/results.{fmt}", dest, progress)

    def _download(self, path: str, dest: str | Path, progress: Progress | None, **kwargs) -> Path:
        """Stream a file the API serves to `dest` (a folder: the server's file name in it)."""
        dest = Path(dest)
        with self._http.stream("GET", path, timeout=httpx.Timeout(30.0, read=600.0), **kwargs) as resp:
            if resp.is_error:
                resp.read()
                raise _api_error(resp)
            if dest.is_dir():
                dest = dest / _attachment_name(resp)
            total = int(resp.headers.get("content-length") or 0)
            tmp = dest.with_name(dest.name + ".part")
            with open(tmp, "wb") as out:
                for chunk in resp.iter_bytes():
                    out.write(chunk)
                    if progress:
                        progress(out.tell(), total)
            tmp.replace(dest)
        return dest


class _NoEventStream(Exception):
    """This server has no job event stream; poll instead."""


def parse_sse(lines: Iterator[str]) -> Iterator[JobEvent]:
    """Server-sent events (id:, event:, data: lines, a blank line ends one) as JobEvents.

    `data` may be the whole event ({"id", "kind", "data", "created_at"}) or just its data, with
    the kind in the `event:` field.
    """
    fields: dict[str, Any] = {"data": []}
    for line in lines:
        if line == "":
            if fields["data"]:
                yield _sse_event(fields)
            fields = {"data": []}
            continue
        if line.startswith(":"):
            continue  # a comment, e.g. a keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            fields["data"].append(value)
        elif name in ("id", "event"):
            fields[name] = value
    if fields["data"]:
        yield _sse_event(fields)


def _sse_event(fields: dict) -> JobEvent:
    raw = "\n".join(fields["data"])
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {"text": raw}
    if isinstance(payload, dict) and "kind" in payload and "data" in payload:
        return JobEvent(id=payload.get("id", fields.get("id")), kind=payload["kind"],
                        data=payload["data"] or {}, created_at=payload.get("created_at"))
    return JobEvent(id=fields.get("id"), kind=fields.get("event", "message"),
                    data=payload if isinstance(payload, dict) else {"value": payload}, created_at=None)


def is_terminal_event(event: JobEvent) -> bool:
    return event["kind"] == "status" and event["data"].get("status") in TERMINAL


def _event(kind: str, data: dict) -> JobEvent:
    return JobEvent(id=None, kind=kind, data=data, created_at=None)


def _status_event(job: Job) -> JobEvent:
    data: dict[str, Any] = {"status": job["status"]}
    if job.get("model_id"):
        data["model_id"] = job["model_id"]
    if job.get("error"):
        data["error"] = job["error"]
    return _event("status", data)


def _segment(name: str) -> str:
    """A name as one URL path segment: a '/' in it reaches the server (which says what names may be)."""
    return quote(name, safe="")


def _api_error(resp: httpx.Response) -> GraftAPIError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    detail = body.get("detail") if isinstance(body, dict) else None
    if not isinstance(detail, str):
        detail = resp.text.strip()[:500] or resp.reason_phrase
    return GraftAPIError(resp.status_code, detail, body if isinstance(body, dict) else None)


def _attachment_name(resp: httpx.Response) -> str:
    disposition = resp.headers.get("content-disposition", "")
    for part in disposition.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "filename" and value:
            return Path(value.strip('"')).name
    return "graft-export.zip"
