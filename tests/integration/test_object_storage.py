"""GRAFT_STORAGE_URL=s3://…: every stored file in a real S3-compatible server (SeaweedFS, see
tests/support/s3.py), the data dir only a cache; sha256 checked on reads; outages answered 503
with Retry-After (never 500) and a worker's job put back, not failed."""
from __future__ import annotations

import hashlib
import io
import shutil
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.store.db import Database
from service.store.objects import ObjectCorrupt, ObjectMissing, S3Objects, store_for
from service.store.tables import Job
from tests.support.data import subset_zip
from tests.support.live import free_port
from tests.support.s3 import BUCKET, WeedServer, object_keys, read_after_restart, s3_client, s3_env
from workers.checkpoints import read_checkpoint, write_checkpoint
from workers.worker import Worker

PROBE = {"strategy": "linear_probe", "image_size": 64, "epochs": 3}


def prefix_of(settings) -> str:
    return settings.storage_url.split(f"s3://{BUCKET}/", 1)[1]


def other_machine(settings, tmp_path, name: str):
    """The same database and bucket from a machine with an empty cache of its own."""
    return settings.model_copy(update={"data_dir": tmp_path / name})


def png_bytes() -> bytes:
    from tests.support.data import hymenoptera_files

    return hymenoptera_files("val", "ants")[0].read_bytes()


def test_upload_train_predict_export_from_the_bucket_with_a_fresh_cache_elsewhere(s3_settings, s3_endpoint,
                                                                                 tmp_path):
    settings = s3_settings
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(6, 3))}).json()
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **PROBE}).json()
        # The worker is another machine: its own cache, nothing shared with the API but the DB and the bucket.
        worker_settings = other_machine(settings, tmp_path, "worker-machine")
        worker_settings.ensure_dirs()
        Worker(worker_settings).run(max_jobs=1)
        model_id = client.get(f"/v1/jobs/{job['id']}").json()["model_id"]
        batch = client.post(f"/v1/models/{model_id}/batch-predictions", json={"dataset_id": dataset["id"]}).json()
        Worker(other_machine(settings, tmp_path, "batch-machine")).run(max_jobs=1)
        rows = client.get(f"/v1/batch-predictions/{batch['id']}/results.csv")
        assert rows.status_code == 200 and len(rows.text.splitlines()) == dataset["num_images"] + 1, rows.text
    keys = object_keys(s3_endpoint, prefix_of(settings))
    assert sum("/blobs/" in k for k in keys) == dataset["num_images"]
    with Database(settings.database_url).session() as s:
        job_row = s.get(Job, job["id"])
        assert job_row.status == "succeeded", (job_row.error_code, job_row.error_message)
        model_id = job_row.model_id
    assert {f"{prefix_of(settings)}/models/{model_id}/{f}" for f in ("model.safetensors", "manifest.json")} <= set(keys)
    assert not (settings.models_dir / model_id).exists()  # the API's machine never saw the model being written

    # A third machine (an API replica) with an empty cache predicts and exports from the bucket.
    api2 = other_machine(settings, tmp_path, "api-machine")
    with TestClient(create_app(api2)) as client:
        answer = client.post(f"/v1/models/{model_id}/predict", files={"file": ("a.jpg", png_bytes())})
        assert answer.status_code == 200, answer.text
        export = client.get(f"/v1/models/{model_id}/export", params={"format": "safetensors"})
        assert export.status_code == 200 and zipfile.ZipFile(io.BytesIO(export.content)).namelist()
    assert any("/exports/" in k for k in object_keys(s3_endpoint, prefix_of(settings)))
    assert (api2.data_dir / "cache" / "objects" / "models" / model_id / "model.safetensors").is_file()  # cached


def test_every_read_checks_the_sha256_against_the_objects_metadata(s3_settings, s3_endpoint):
    store = store_for(s3_settings)
    path = store.local("checkpoints/j/a.bin")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"the bytes as written")
    store.commit("checkpoints/j/a.bin")
    client = s3_client(s3_endpoint)
    key = f"{prefix_of(s3_settings)}/checkpoints/j/a.bin"
    original = client.head_object(Bucket=BUCKET, Key=key)["Metadata"]
    client.put_object(Bucket=BUCKET, Key=key, Body=b"the bytes, altered", Metadata=original)
    shutil.rmtree(s3_settings.objects_root)  # nothing cached: the read goes to the store
    with pytest.raises(ObjectCorrupt):
        store.fetch("checkpoints/j/a.bin")
    assert not store.local("checkpoints/j/a.bin").exists()  # bad bytes never take the name
    with pytest.raises(ObjectMissing):
        store.fetch("checkpoints/j/none.bin")


def test_a_deleted_projects_files_leave_the_bucket(s3_settings, s3_endpoint):
    from service.store.blobs import BlobStore
    from service.store.projects import Deleted, remove_files

    store, blobs = store_for(s3_settings), BlobStore.for_settings(s3_settings)
    kept, gone = blobs.put(b"another project's image"), blobs.put(b"this project's image")
    for key in ("models/m1/model.safetensors", "exports/m1-abc-onnx.zip", "exports/m2-abc-onnx.zip",
                "checkpoints/j1/a-epoch1.pt", "batch_predictions/j1/results.csv"):
        store.local(key).parent.mkdir(parents=True, exist_ok=True)
        store.local(key).write_bytes(key.encode())
        store.commit(key)
    remove_files(s3_settings, blobs, Deleted(blobs=[gone], model_dirs=["models/m1"], model_ids=["m1"],
                                             job_ids=["j1"]))
    left = {k.split("/", 1)[1] for k in object_keys(s3_endpoint, prefix_of(s3_settings))}
    assert left == {blobs.key(kept), "exports/m2-abc-onnx.zip"}


def test_a_checkpoint_written_on_one_machine_resumes_on_another(s3_settings, tmp_path):
    state = {"epoch": 2, "weights": [1.0, 2.0]}
    relative = write_checkpoint(s3_settings, "job1", "lease1", 2, state)
    elsewhere = other_machine(s3_settings, tmp_path, "elsewhere")
    assert read_checkpoint(elsewhere, relative) == state


def test_an_outage_is_a_503_with_retry_after_and_leaves_nothing(tmp_path, monkeypatch, s3_settings):
    """A store nobody answers at (connection refused: what a stopped server gives)."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    settings = s3_settings.model_copy(update={"storage_url": s3_settings.storage_url + "-dead"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        upload = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(3, 2))})
        assert upload.status_code == 503, upload.text
        assert upload.headers["content-type"] == "application/problem+json"
        assert upload.headers["retry-after"] == "1" and upload.json()["code"] == "storage_unavailable"
        assert client.get("/v1/datasets").json() == []  # the dataset row rolled back with it
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "object store" in ready.json()["detail"]
    assert not list((settings.tmp_dir).glob("upload-*"))  # staging removed


def test_a_store_killed_mid_upload_leaves_no_dataset_and_no_partial_object(s3_settings, tmp_path, monkeypatch):
    server = WeedServer(tmp_path / "weed").start()
    try:
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        # The product's default timeout and retries: a store just restarted after a SIGKILL can take
        # more than the suite's 2 s to answer its first writes (it did in CI).
        settings = s3_settings.model_copy(update={"storage_url": s3_settings.storage_url + "-kill",
                                                  "storage_timeout_s": 10.0, "storage_max_attempts": 3})
        real_put, calls = S3Objects.put_file, []

        def put_then_kill(self, key, source):
            calls.append(key)
            if len(calls) == 3:
                server.stop()  # SIGKILL while the other uploads are in flight
            return real_put(self, key, source)

        monkeypatch.setattr(S3Objects, "put_file", put_then_kill)
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            upload = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(6, 3))})
            assert upload.status_code == 503 and int(upload.headers["retry-after"]) >= 1, upload.text
            server.start()
            assert client.get("/v1/datasets").json() == []
            client_s3 = s3_client(server.endpoint)
            for key in object_keys(server.endpoint, prefix_of(settings)):  # what got in is whole
                assert hashlib.sha256(read_after_restart(client_s3, key)).hexdigest() == key.rsplit("/", 1)[1]
            monkeypatch.setattr(S3Objects, "put_file", real_put)
            again = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(6, 3))})
            assert again.status_code == 201, again.text
    finally:
        server.close()


def test_a_job_whose_store_is_down_waits_in_the_queue_then_succeeds(s3_settings, tmp_path, monkeypatch):
    server = WeedServer(tmp_path / "weed").start()
    try:
        for name, value in s3_env(server.endpoint).items():
            monkeypatch.setenv(name, value)
        settings = s3_settings.model_copy(update={"storage_url": s3_settings.storage_url + "-job"})
        with TestClient(create_app(settings)) as client:
            dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(5, 3))}).json()
            job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], **PROBE}).json()
        server.stop()
        worker_settings = other_machine(settings, tmp_path, "worker").model_copy(
            update={"database_url": settings.database_url})
        worker_settings.ensure_dirs()
        Worker(worker_settings).run(max_jobs=1)  # cannot read the images: put back, not failed
        db = Database(settings.database_url)
        with db.session() as s:
            row = s.get(Job, job["id"])
            assert (row.status, row.attempts, row.error_code) == ("queued", 0, "storage_unavailable")
        server.start()
        # A restarted SeaweedFS can still refuse a read or two (InternalError) while its volumes come
        # back: the job waits in the queue again, uncounted, until a worker's read succeeds.
        deadline = time.monotonic() + 60
        while True:
            Worker(worker_settings.model_copy(update={"data_dir": tmp_path / "worker2"})).run(max_jobs=1)
            with db.session() as s:
                row = s.get(Job, job["id"])
                status, attempts, error = row.status, row.attempts, (row.error_code, row.error_message)
            if status != "queued" or time.monotonic() > deadline:
                break
            assert error[0] == "storage_unavailable", error
        assert status == "succeeded", error
        assert attempts == 1
        db.dispose()
    finally:
        server.close()
