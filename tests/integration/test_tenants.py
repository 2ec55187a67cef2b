"""Tenants who cannot reach each other or escape their limits (issue 21): only the operator makes
and re-quotas projects, look-alike names collide, caches and event ids say nothing of other
projects, a revoked key's stream ends, /metrics and /readyz keep their numbers from strangers,
and deleting a project removes all of it and nothing else."""
from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from pydantic import SecretStr
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.api.auth import create_key, create_project
from service.app import create_app
from service.errors import Conflict
from service.settings import Settings
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.queue import JobQueue
from service.store.tables import ApiKey, Dataset, DatasetImage, Job, JobEvent, Model, Project
from tests.support.data import subset_zip

TINY_PROBE = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def secured(settings) -> Settings:
    return settings.model_copy(update={"auth_required": True, "min_images_per_class": 2})


def operator_key(settings: Settings) -> str:
    db = Database(settings.database_url)
    with db.session() as s:
        _, key = create_key(s, "default", "op", "admin", operator=True)
    db.dispose()
    return key


def new_project(client: TestClient, op: str, name: str, **quotas) -> tuple[str, str]:
    """(project id, its admin key), made by the operator."""
    resp = client.post("/v1/projects", json={"name": name, "quotas": quotas}, headers=bearer(op))
    assert resp.status_code == 201, resp.text
    return resp.json()["project"]["id"], resp.json()["admin_key"]["key"]


def test_only_the_operator_sets_quotas_and_they_bind_at_once(secured):
    op = operator_key(secured)
    with TestClient(create_app(secured)) as client:
        project_id, admin = new_project(client, op, "team", max_concurrent_jobs=1)
        a = bearer(admin)
        assert client.post("/v1/projects", json={"name": "mine", "quotas": {"max_concurrent_jobs": 0}},
                           headers=a).status_code == 403
        raise_own = client.patch(f"/v1/projects/{project_id}", json={"quotas": {"max_concurrent_jobs": 0}}, headers=a)
        assert raise_own.status_code == 403 and "operator" in raise_own.json()["detail"]
        ds = client.post("/v1/datasets", files={"file": ("t.zip", subset_zip(2, 1))}, headers=a).json()["id"]
        assert client.post("/v1/jobs", json={"dataset_id": ds}, headers=a).status_code == 202
        assert client.post("/v1/jobs", json={"dataset_id": ds}, headers=a).status_code == 429

        changed = client.patch(f"/v1/projects/{project_id}", headers=bearer(op),
                               json={"quotas": {"max_concurrent_jobs": 2, "max_datasets": 1}})
        assert changed.status_code == 200, changed.text
        assert changed.json()["quotas"] == {"max_concurrent_jobs": 2, "max_datasets": 1}
        assert client.post("/v1/jobs", json={"dataset_id": ds}, headers=a).status_code == 202
        assert client.post("/v1/jobs", json={"dataset_id": ds}, headers=a).status_code == 429
        second = client.post("/v1/datasets", files={"file": ("u.zip", subset_zip(2, 1))}, headers=a)
        assert second.status_code == 403 and "max_datasets" in second.json()["detail"]

        restored = client.patch(f"/v1/projects/{project_id}", json={"quotas": {"max_datasets": None}},
                                headers=bearer(op))
        assert restored.json()["quotas"] == {"max_concurrent_jobs": 2}
        assert client.post("/v1/datasets", files={"file": ("u.zip", subset_zip(2, 1))}, headers=a).status_code == 201
        assert client.patch(f"/v1/projects/{project_id}", json={"quotas": {"max_datasets": -1}},
                            headers=bearer(op)).status_code == 422


def test_look_alike_names_collide_and_only_the_operator_hears_of_names(secured):
    op = operator_key(secured)
    with TestClient(create_app(secured)) as client:
        _, admin = new_project(client, op, "beta")
        for alike in ("Beta", "beta ", "beta.", "BETA._"):
            taken = client.post("/v1/projects", json={"name": alike}, headers=bearer(op))
            assert taken.status_code == 409, (alike, taken.text)
            assert "'beta'" in taken.json()["detail"]
        # An admin gets one answer, whether the name exists or not, and never the list of projects.
        answers = [client.post("/v1/projects", json={"name": name}, headers=bearer(admin))
                   for name in ("beta", "Beta.", "gamma")]
        assert {(r.status_code, r.json()["detail"]) for r in answers} == {(403, answers[0].json()["detail"])}
        assert [p["name"] for p in client.get("/v1/projects", headers=bearer(admin)).json()] == ["beta"]
        assert {"default", "beta"} <= {p["name"] for p in client.get("/v1/projects", headers=bearer(op)).json()}
        assert client.post("/v1/projects", json={"name": "gamma"}, headers=bearer(op)).status_code == 201
    db = Database(secured.database_url)  # names the CLI accepts: composed and decomposed accents are one
    with db.session() as s:
        create_project(s, "Caf\u00e9")
    with pytest.raises(Conflict), db.session() as s:
        create_project(s, " cafe\u0301 ")
    db.dispose()


def test_event_ids_count_the_jobs_own_events_only(secured):
    op = operator_key(secured)
    with TestClient(create_app(secured)) as client:
        ids = []
        for name in ("one", "two"):
            _, admin = new_project(client, op, name)
            ds = client.post("/v1/datasets", files={"file": ("t.zip", subset_zip(2, 1))},
                             headers=bearer(admin)).json()["id"]
            for _ in range(3):  # each job: "queued", then "cancelled"
                job = client.post("/v1/jobs", json={"dataset_id": ds}, headers=bearer(admin)).json()["id"]
                client.post(f"/v1/jobs/{job}/cancel", headers=bearer(admin))
            events = client.get(f"/v1/jobs/{job}/events", headers=bearer(admin)).json()
            ids.append([e["id"] for e in events])
            assert [e["id"] for e in client.get(f"/v1/jobs/{job}/events?after_id=1", headers=bearer(admin)).json()] == [2]
            with client.stream("GET", f"/v1/jobs/{job}/events", headers={**bearer(admin), "Accept": "text/event-stream",
                                                                            "Last-Event-ID": "1"}) as resp:
                assert [line for line in resp.iter_lines() if line.startswith("id:")] == ["id: 2"]
        assert ids == [[1, 2], [1, 2]]  # the sixth job's log reads like the first's


def test_a_revoked_keys_event_stream_closes_within_seconds(secured):
    op = operator_key(secured)
    with TestClient(create_app(secured)) as client:
        project_id, admin = new_project(client, op, "streams")
        trainer = client.post(f"/v1/projects/{project_id}/keys", json={"name": "t", "scope": "train"},
                              headers=bearer(admin)).json()
        ds = client.post("/v1/datasets", files={"file": ("t.zip", subset_zip(2, 1))}, headers=bearer(admin)).json()["id"]
        job = client.post("/v1/jobs", json={"dataset_id": ds}, headers=bearer(admin)).json()["id"]  # no worker: stays queued
        opened, ended = threading.Event(), []

        def follow():
            with client.stream("GET", f"/v1/jobs/{job}/events",
                               headers={**bearer(trainer["key"]), "Accept": "text/event-stream"}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("id:"):
                        opened.set()
            ended.append(time.monotonic())

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert opened.wait(10)
        time.sleep(1.0)
        assert not ended  # a live key's stream stays open on a queued job
        revoked_at = time.monotonic()
        assert client.delete(f"/v1/keys/{trainer['id']}", headers=bearer(admin)).status_code == 200
        reader.join(10)
        assert ended and ended[0] - revoked_at < 5.0, ended


def test_metrics_need_the_token_or_loopback_and_readyz_tells_strangers_little(secured):
    token = "scrape-me-" + "x" * 20
    op = operator_key(secured)
    with_token = secured.model_copy(update={"metrics_token": SecretStr(token)})
    with TestClient(create_app(with_token), client=("127.0.0.1", 40000)) as local:
        assert local.get("/metrics").status_code == 401  # a token set binds everyone, loopback too
        assert local.get("/metrics", headers=bearer("wrong")).status_code == 401
        scraped = local.get("/metrics", headers=bearer(token))
        assert scraped.status_code == 200 and "graft_jobs" in scraped.text
        assert local.get("/metrics", headers=bearer(op)).status_code == 200
        _, admin = new_project(local, op, "tenant")
        assert local.get("/metrics", headers=bearer(admin)).status_code == 403
    with TestClient(create_app(secured), client=("203.0.113.7", 40000)) as remote:
        refused = remote.get("/metrics")
        assert refused.status_code == 401 and "GRAFT_METRICS_TOKEN" in refused.json()["detail"]
        assert remote.get("/readyz").json() == {"status": "ready"}
        detailed = remote.get("/readyz", headers=bearer(op)).json()
        assert detailed["checks"]["database"]["dialect"] == "sqlite"
        assert remote.get("/readyz", headers=bearer(admin)).json() == {"status": "ready"}
        secured.models_dir.rename(Path(str(secured.models_dir) + "-away"))
        try:
            broken = remote.get("/readyz")
            assert broken.status_code == 503 and broken.json()["detail"] == "not ready"
            assert "checks" not in broken.json() and str(secured.data_dir) not in broken.text
        finally:
            Path(str(secured.models_dir) + "-away").rename(secured.models_dir)
    with TestClient(create_app(secured), client=("127.0.0.1", 40000)) as local:
        assert local.get("/metrics").status_code == 200  # no token: loopback may scrape
        assert "artifact_store" in local.get("/readyz").json()["checks"]


def test_two_projects_on_the_same_images_each_extract_their_own_features(secured):
    """The feature and decoded-image caches are per project: a tenant's first probe on images
    another tenant trained on reuses nothing (and so learns nothing); its second one reuses its own."""
    from workers.training.probe import REUSED_FEATURES
    from workers.worker import Worker

    op = operator_key(secured)
    REUSED_FEATURES.clear()
    try:
        with TestClient(create_app(secured)) as client:
            tenants = {}
            for name in ("first", "second"):
                _, admin = new_project(client, op, name)
                ds = client.post("/v1/datasets", files={"file": ("same.zip", subset_zip(3, 2))},
                                 headers=bearer(admin)).json()["id"]
                tenants[name] = (bearer(admin), ds)
            reused = []
            for name in ("first", "second", "first"):
                headers, ds = tenants[name]
                job_id = client.post("/v1/jobs", json={"dataset_id": ds, **TINY_PROBE}, headers=headers).json()["id"]
                Worker(secured.model_copy(update={"worker_device": "cpu"})).run(max_jobs=1)
                job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
                assert job["status"] == "succeeded", job
                reused.append(client.get(f"/v1/models/{job['model_id']}", headers=headers).json()["metrics"]["features_reused"])
        assert reused == [False, False, True]
    finally:
        REUSED_FEATURES.clear()


# -- deleting a project ------------------------------------------------------------------------

def rows_of(db: Database, project_id: str) -> dict[str, int]:
    with db.session() as s:
        datasets = select(Dataset.id).where(Dataset.project_id == project_id)
        jobs = select(Job.id).where(Job.project_id == project_id)
        count = lambda q: s.scalar(select(func.count()).select_from(q.subquery()))
        return {"project": count(select(Project.id).where(Project.id == project_id)),
                "datasets": count(datasets), "images": count(select(DatasetImage.id).where(DatasetImage.dataset_id.in_(datasets))),
                "jobs": count(jobs), "events": count(select(JobEvent.id).where(JobEvent.job_id.in_(jobs))),
                "models": count(select(Model.id).where(Model.project_id == project_id)),
                "keys": count(select(ApiKey.id).where(ApiKey.project_id == project_id))}


def files_of(settings: Settings, db: Database, project_id: str) -> dict[str, list]:
    blobs = BlobStore(settings.blobs_dir)
    with db.session() as s:
        shas = set(s.scalars(select(DatasetImage.sha256).join(Dataset, Dataset.id == DatasetImage.dataset_id)
                             .where(Dataset.project_id == project_id)))
        models = s.scalars(select(Model).where(Model.project_id == project_id)).all()
        jobs = s.scalars(select(Job.id).where(Job.project_id == project_id)).all()
        return {"blobs": sorted(sha for sha in shas if blobs.exists(sha)),
                "models": sorted(str(p) for m in models for p in settings.data_path(m.artifact_dir).rglob("*")),
                "exports": sorted(str(p) for m in models for p in settings.exports_dir.glob(f"{m.id}-*")),
                "checkpoints": sorted(str(p) for j in jobs for p in (settings.checkpoints_dir / j).rglob("*"))}


def add_model_and_files(settings: Settings, db: Database, project_id: str, job_id: str, dataset_id: str) -> None:
    """A model row with its artifact folder, an export zip and a checkpoint, as a worker leaves them."""
    with db.session() as s:
        model = Model(project_id=project_id, job_id=job_id, dataset_id=dataset_id, backbone="efficientnet_lite0",
                      classes=["ants", "bees"], metrics={}, recipe={}, artifact_dir=f"models/{job_id}", sha256="0" * 64,
                      size_bytes=1)
        s.add(model)
        s.flush()
        model_id = model.id
    (settings.models_dir / job_id).mkdir(parents=True)
    (settings.models_dir / job_id / "model.safetensors").write_bytes(b"weights")
    settings.exports_dir.mkdir(parents=True, exist_ok=True)
    (settings.exports_dir / f"{model_id}-{'0' * 16}-onnx.zip").write_bytes(b"zip")
    (settings.checkpoints_dir / job_id).mkdir(parents=True)
    (settings.checkpoints_dir / job_id / "lease-epoch1.pt").write_bytes(b"state")


def test_deleting_a_project_removes_all_of_it_and_nothing_of_another(any_db_settings):
    settings = any_db_settings.model_copy(update={"auth_required": True, "min_images_per_class": 2,
                                                  "cancel_poll_s": 0.1})
    op = operator_key(settings)
    db = Database(settings.database_url)
    with TestClient(create_app(settings)) as client:
        projects = {}
        for name, size in (("keep", (2, 1)), ("gone", (4, 2))):  # "gone" holds "keep"'s images and more
            project_id, admin = new_project(client, op, name)
            ds = client.post("/v1/datasets", files={"file": ("d.zip", subset_zip(*size))}, headers=bearer(admin)).json()["id"]
            done = client.post("/v1/jobs", json={"dataset_id": ds}, headers=bearer(admin)).json()["id"]
            client.post(f"/v1/jobs/{done}/cancel", headers=bearer(admin))
            add_model_and_files(settings, db, project_id, done, ds)
            running = client.post("/v1/jobs", json={"dataset_id": ds, "priority": -1 if name == "gone" else 0},
                                  headers=bearer(admin)).json()["id"]
            projects[name] = (project_id, admin, running)
        gone_id, gone_admin, gone_running = projects["gone"]
        keep_id, keep_admin, _ = projects["keep"]

        # A stand-in worker holds "gone"'s job and stops when told to, as a real one does.
        queue = JobQueue(db, stale_after_s=30)
        claim = queue.claim("stand-in")
        assert claim.job_id == gone_running

        def stand_in_worker():
            while queue.lease_state(claim) == "ok":
                time.sleep(0.05)
            queue.finish_cancelled(claim)

        threading.Thread(target=stand_in_worker, daemon=True).start()
        keep_rows, keep_files = rows_of(db, keep_id), files_of(settings, db, keep_id)
        gone_files = files_of(settings, db, gone_id)
        assert keep_rows["images"] == 6 and rows_of(db, gone_id)["images"] == 12
        assert all(keep_files.values()) and set(keep_files["blobs"]) < set(gone_files["blobs"])

        assert client.delete(f"/v1/projects/{gone_id}", headers=bearer(gone_admin)).status_code == 403
        deleted = client.delete(f"/v1/projects/{gone_id}", headers=bearer(op))
        assert deleted.status_code == 200, deleted.text
        assert deleted.json()["deleted"] == {"datasets": 1, "images": 12, "models": 1, "jobs": 2, "keys": 1,
                                             "blobs": 6}
        assert set(rows_of(db, gone_id).values()) == {0}
        for kind, paths in gone_files.items():
            if kind != "blobs":
                assert not any(os.path.exists(p) for p in paths), kind
        blobs = BlobStore(settings.blobs_dir)
        assert sorted(sha for sha in gone_files["blobs"] if blobs.exists(sha)) == keep_files["blobs"]
        assert rows_of(db, keep_id) == keep_rows and files_of(settings, db, keep_id) == keep_files
        assert client.get("/v1/datasets", headers=bearer(gone_admin)).status_code == 401
        assert len(client.get("/v1/datasets", headers=bearer(keep_admin)).json()) == 1
        assert client.delete(f"/v1/projects/{gone_id}", headers=bearer(op)).status_code == 404
        assert client.delete("/v1/projects/default", headers=bearer(op)).status_code == 409
    db.dispose()


def test_a_revoked_keys_export_download_stops_mid_transfer(tmp_path):
    """The export zip streams chunk by chunk, the key re-checked before each: revoked mid-transfer,
    the client gets a short body (an error), never the rest of the file."""
    import httpx

    from tests.support.live import uvicorn_thread
    from tests.support.training import api_with_trained_probe

    with api_with_trained_probe(tmp_path / "data") as (settings, client, _, job):
        secured = settings.model_copy(update={"auth_required": True})
        db = Database(secured.database_url)
        with db.session() as s:
            key_row, key = create_key(s, "default", "downloader", "train")
            key_id = key_row.id
        with uvicorn_thread(create_app(secured)) as url:
            export = f"{url}/v1/models/{job['model_id']}/export?format=safetensors"
            with httpx.Client(timeout=60) as http:
                whole = http.get(export, headers=bearer(key))
                assert whole.status_code == 200 and len(whole.content) == int(whole.headers["content-length"])
                got = 0
                with pytest.raises(httpx.RemoteProtocolError):  # the body ends short of its length
                    with http.stream("GET", export, headers=bearer(key)) as resp:
                        for chunk in resp.iter_bytes(64 * 1024):
                            if not got:
                                with db.session() as s:
                                    s.get(ApiKey, key_id).revoked_at = datetime.now(timezone.utc)
                                time.sleep(0.5)  # let the server's socket buffers fill
                            got += len(chunk)
                assert got < len(whole.content)
        db.dispose()
