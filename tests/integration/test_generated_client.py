"""The OpenAPI document is a contract a generated client can use, unmodified.

openapi-python-client (the generator the issue's user ran) builds a client from a live server's
/openapi.json, offline, into tmp_path; that client then uploads a dataset, trains a linear probe
(a real Worker in a thread), reads the model, predicts and exports, and reads /readyz.
"""
from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest

from service.api.auth import create_key, create_project
from service.app import create_app
from service.settings import Settings
from service.store.db import Database
from service.store.migrate import upgrade
from tests.support.data import hymenoptera_files, subset_zip
from tests.support.live import uvicorn_thread
from workers.worker import Worker

TINY_JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}
# No post-generation hooks (ruff), so nothing runs but the generator; application/zip is binary data
# to openapi-python-client 0.29 only through this documented override (it knows application/octet-stream);
# so are the PNG plots and JPEG thumbnails.
GENERATOR_CONFIG = """\
post_hooks: []
content_type_overrides:
  application/zip: application/octet-stream
  image/png: application/octet-stream
  image/jpeg: application/octet-stream
"""
# Any network call from the generator would go through this dead proxy and fail.
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "ALL_PROXY": "http://127.0.0.1:9",
           "NO_PROXY": ""}


@pytest.fixture
def server(tmp_path):
    """A real server on a loopback port, keys required, and an admin key for it."""
    settings = Settings(data_dir=tmp_path / "data", auth_required=True, min_images_per_class=2,
                        heartbeat_interval_s=1.0, poll_interval_s=0.1)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    with db.session() as s:
        _, key = create_key(s, create_project(s, "generated").id, "client", "admin")
    db.dispose()
    with uvicorn_thread(create_app(settings)) as url:
        yield settings, url, key


def generate_client(schema_url: str, where: Path):
    """openapi-python-client's output for the live schema, imported as the package `graft_client`."""
    (where / "openapi.json").write_bytes(httpx.get(schema_url).raise_for_status().content)
    (where / "generator.yaml").write_text(GENERATOR_CONFIG)
    done = subprocess.run(
        [sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json", "--meta", "none",
         "--output-path", "graft_client", "--config", "generator.yaml"],
        cwd=where, capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stdout + done.stderr  # nothing skipped
    sys.path.insert(0, str(where))
    try:
        return importlib.import_module("graft_client")
    finally:
        sys.path.remove(str(where))


def test_a_generated_client_uploads_trains_predicts_and_exports(server, tmp_path):
    settings, url, key = server
    gen = generate_client(f"{url}/openapi.json", tmp_path)
    api = importlib.import_module("graft_client.api")
    models = importlib.import_module("graft_client.models")
    types = importlib.import_module("graft_client.types")
    client = gen.AuthenticatedClient(base_url=url, token=key, timeout=httpx.Timeout(120))

    upload = importlib.import_module("graft_client.api.datasets.upload_dataset_v1_datasets_post")
    dataset = upload.sync(client=client, body=models.BodyUploadDatasetV1DatasetsPost(
        file=types.File(payload=io.BytesIO(subset_zip(3, 2)), file_name="bugs.zip", mime_type="application/zip"),
        name="bugs"))
    assert isinstance(dataset, models.DatasetOut), dataset
    assert dataset.name == "bugs" and dataset.num_images == 10

    create_job = importlib.import_module("graft_client.api.jobs.create_job_v1_jobs_post")
    job = create_job.sync(client=client, body=models.JobCreate.from_dict({"dataset_id": dataset.id, **TINY_JOB}))
    assert isinstance(job, models.JobOut), job
    worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
    worker.start()
    worker.join(240)
    job = importlib.import_module("graft_client.api.jobs.get_job_v1_jobs_job_id_get").sync(job.id, client=client)
    assert job.status.value == "succeeded", job

    model = importlib.import_module("graft_client.api.models.get_model_v1_models_model_id_get").sync(
        job.model_id, client=client)
    assert isinstance(model, models.ModelOut) and model.classes == ["ants", "bees"]

    photos = [hymenoptera_files("val", label)[5] for label in ("ants", "bees")]
    predict = importlib.import_module("graft_client.api.models.predict_images_v1_models_model_id_predict_post")
    answer = predict.sync(model.id, client=client, top_k=2, body=models.BodyPredictImagesV1ModelsModelIdPredictPost(
        file=[types.File(payload=io.BytesIO(p.read_bytes()), file_name=p.name, mime_type="image/jpeg")
              for p in photos]))
    assert isinstance(answer, models.PredictResponse), answer
    assert len(answer.results) == 2
    assert all({c.label for c in r.predictions} == {"ants", "bees"} for r in answer.results)

    export = importlib.import_module("graft_client.api.models.export_model_v1_models_model_id_export_get")
    archive = export.sync(model.id, client=client, format_=models.ExportFormat("safetensors"))
    assert isinstance(archive, types.File), archive
    with zipfile.ZipFile(archive.payload) as zf:
        assert {"manifest.json", "USAGE.md"} <= set(zf.namelist())

    ready = importlib.import_module("graft_client.api.operations.readyz_readyz_get").sync(client=client)
    # a project's key hears "ready"; the checks themselves are for the operator (issue 21)
    assert isinstance(ready, models.Readiness) and ready.status == "ready", ready

    refused = upload.sync_detailed(client=gen.AuthenticatedClient(base_url=url, token="graft_wrong"),
                                   body=models.BodyUploadDatasetV1DatasetsPost(
                                       file=types.File(payload=io.BytesIO(b"x"), file_name="x.zip")))
    assert refused.status_code == 401 and isinstance(refused.parsed, models.Problem)
