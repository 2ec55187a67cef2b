"""Projects and API keys: nobody sees or touches what is not theirs.

Walks every route of the OpenAPI schema with project A's key against project B's objects (404,
nothing changed), with a predict-only key against training routes (403), with a revoked key and
with no key (401); checks key storage, quotas, rate limits and the open-mode safeguards.
"""
from __future__ import annotations

import hashlib
import io
import re
from ipaddress import ip_network

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from service.app import create_app
from service.api.auth import auth_is_open, check_exposure, create_key, create_project
from service.store.db import Database
from service.settings import Settings
from service.enums import JobKind
from service.store.queue import JobQueue
from service.store.tables import ApiKey, Dataset, DatasetImage, Job, JobEvent, Model, ModelAlias, Webhook
from tests.support.data import subset_zip

PUBLIC = {"/healthz", "/readyz", "/metrics", "/"}
OPERATOR_ONLY = {("POST", "/v1/projects"), ("PATCH", "/v1/projects/{project_id}"),
                 ("DELETE", "/v1/projects/{project_id}")}


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def secured(any_db_settings) -> Settings:
    return any_db_settings.model_copy(update={"auth_required": True, "min_images_per_class": 2,
                                              "webhook_allowed_networks": [ip_network("127.0.0.0/8")]})


@pytest.fixture
def world(secured):
    """Projects A and B with keys, and an operator key; B owns a dataset, a job and a model."""
    db = Database(secured.database_url)
    keys = {}
    with db.session() as s:
        operator, keys["operator"] = create_key(s, "default", "op", "admin", operator=True)
        keys["operator-id"] = operator.id
        for name in ("a", "b"):
            project = create_project(s, f"project-{name}")
            for scope in ("admin", "train", "predict"):
                row, plain = create_key(s, project.id, f"{name}-{scope}", scope)
                keys[f"{name}-{scope}"] = plain
                keys[f"{name}-{scope}-id"] = row.id
            keys[f"{name}-project"] = project.id
    with TestClient(create_app(secured)) as client:
        b = {"Authorization": f"Bearer {keys['b-admin']}"}
        ds = client.post("/v1/datasets", files={"file": ("b.zip", subset_zip(2, 1))}, headers=b).json()
        job = client.post("/v1/jobs", json={"dataset_id": ds["id"]}, headers=b).json()
        with db.session() as s:
            image = s.scalar(select(DatasetImage.sha256).where(DatasetImage.dataset_id == ds["id"]))
            model = Model(project_id=keys["b-project"], job_id=job["id"], dataset_id=ds["id"], backbone="efficientnet_lite0",
                          classes=["ants", "bees"], metrics={}, recipe={}, artifact_dir="models/x", sha256="0" * 64,
                          size_bytes=1)
            s.add(model)
            s.flush()
            model_id = model.id
            s.add(ModelAlias(project_id=keys["b-project"], name="b-live", model_id=model_id))
            batch = JobQueue.enqueue(s, project_id=keys["b-project"], dataset_id=ds["id"], config={"top_k": 2},
                                     max_attempts=1, kind=JobKind.batch_predict, source_model_id=model_id)
            hook = Webhook(project_id=keys["b-project"], url="http://127.0.0.1:9/b", events=["alias.moved"],
                           secret="s" * 32)
            s.add(hook)
            s.flush()
            batch_id, webhook_id = batch.id, hook.id
        ids = {"dataset_id": ds["id"], "job_id": job["id"], "model_id": model_id, "image_id": image,
               "project_id": keys["b-project"], "key_id": keys["b-admin-id"], "name": "b-live",
               "batch_id": batch_id, "webhook_id": webhook_id, "fmt": "csv"}
        yield client, keys, ids, db
    db.dispose()


def snapshot(db: Database, project_id: str) -> dict:
    with db.session() as s:
        return {
            "datasets": [(d.id, d.version, d.num_images, d.next_version_id, d.frozen)
                         for d in s.scalars(select(Dataset).where(Dataset.project_id == project_id).order_by(Dataset.id))],
            "images": s.scalars(select(DatasetImage.sha256).join(Dataset, Dataset.id == DatasetImage.dataset_id)
                                .where(Dataset.project_id == project_id).order_by(DatasetImage.id)).all(),
            "jobs": [(j.id, j.status, j.cancel_requested) for j in s.scalars(select(Job).where(Job.project_id == project_id))],
            "events": s.scalars(select(JobEvent.id).join(Job, Job.id == JobEvent.job_id)
                                .where(Job.project_id == project_id)).all(),
            "keys": [(k.id, k.revoked_at) for k in s.scalars(select(ApiKey).where(ApiKey.project_id == project_id))],
        }


def operations(app) -> list[tuple[str, str]]:
    return [(method.upper(), path) for path, item in app.openapi()["paths"].items() for method in item
            if path not in PUBLIC and not path.startswith("/static")]


def request_kwargs(method: str, path: str, ids: dict) -> dict:
    if path.endswith("/predict") or path.endswith("/explain"):
        return {"files": {"file": ("x.png", png(), "image/png")}}
    if path.endswith("/images") and method == "POST":
        return {"files": {"file": ("x.png", png(), "image/png")}, "data": {"label": "ants"}}
    if path == "/v1/datasets" and method == "POST":
        return {"files": {"file": ("a.zip", subset_zip(2, 1))}}
    if path == "/v1/jobs" and method == "POST":
        return {"json": {"dataset_id": ids["dataset_id"]}}
    if path.endswith("/keys") and method == "POST":
        return {"json": {"name": "intruder", "scope": "admin"}}
    if path == "/v1/projects" and method == "POST":
        return {"json": {"name": "another"}}
    if path == "/v1/aliases/{name}" and method == "PUT":
        return {"json": {"model_id": ids["model_id"]}}
    if path == "/v1/webhooks" and method == "POST":  # a receiver of A's own, on loopback (allowed below)
        return {"json": {"url": "http://127.0.0.1:9/a", "events": ["alias.moved"]}}
    if path.endswith("/batch-predictions") and method == "POST":
        return {"json": {"dataset_id": ids["dataset_id"]}}
    if path.endswith("/images") and method == "PATCH":  # label several images
        return {"json": {"images": [{"id": ids["image_id"], "label": "ants"}]}}
    if path.endswith("/images/{image_id}") and method == "PATCH":  # label one image
        return {"json": {"label": "ants"}}
    if path == "/v1/projects/{project_id}" and method == "PATCH":
        return {"json": {"quotas": {"max_datasets": 0}}}
    return {}


def fill(path: str, ids: dict) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)


def test_another_projects_objects_are_404_and_untouched(world):
    client, keys, ids, db = world
    before = snapshot(db, keys["b-project"])
    a = {"Authorization": f"Bearer {keys['a-admin']}"}
    checked = 0
    for method, path in operations(client.app):
        resp = client.request(method, fill(path, ids), headers=a, **request_kwargs(method, path, ids))
        if (method, path) in OPERATOR_ONLY:
            assert resp.status_code == 403 and "operator" in resp.json()["detail"], (method, path, resp.text)
        elif "{" in path or (method, path) == ("POST", "/v1/jobs"):
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
            assert resp.headers["content-type"].startswith("application/problem+json")
            checked += 1
        else:
            assert resp.status_code < 400, (method, path, resp.text)
            assert not set(ids.values()) & set(re.findall(r"[0-9a-f]{32,64}", resp.text)), (method, path)
    assert checked >= 14
    assert snapshot(db, keys["b-project"]) == before


def test_a_predict_key_cannot_reach_training_routes(world):
    client, keys, ids, db = world
    p = {"Authorization": f"Bearer {keys['a-predict']}"}
    for method, path in operations(client.app):
        resp = client.request(method, fill(path, ids), headers=p, **request_kwargs(method, path, ids))
        if path.endswith(("/predict", "/explain")) or "batch-predictions" in path or path == "/v1/backbones":
            assert resp.status_code in (200, 404), (method, path, resp.text)  # predicting is a predict key's
        elif (method, path) in OPERATOR_ONLY:
            assert resp.status_code == 403 and "operator" in resp.json()["detail"], (method, path)
        else:
            assert resp.status_code == 403, (method, path, resp.status_code)
            assert "predict" in resp.json()["detail"]
    own = client.post(f"/v1/models/{ids['model_id']}/predict", headers={"Authorization": f"Bearer {keys['b-predict']}"},
                      files={"file": ("x.png", png(), "image/png")})
    assert own.status_code != 403  # its own project's model: allowed (the fake artifact then fails)


def test_no_key_and_revoked_keys_are_401(world):
    client, keys, ids, db = world
    b = {"Authorization": f"Bearer {keys['b-admin']}"}
    revoked = client.delete(f"/v1/keys/{keys['b-train-id']}", headers=b)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    for headers in ({}, {"Authorization": f"Bearer {keys['b-train']}"}, {"Authorization": "Bearer graft_made_up"}):
        for method, path in operations(client.app):
            resp = client.request(method, fill(path, ids), headers=headers, **request_kwargs(method, path, ids))
            assert resp.status_code == 401, (method, path, headers, resp.status_code)
            assert resp.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").json()["auth"] == "required"


def test_the_database_holds_no_usable_key(world):
    client, keys, ids, db = world
    with db.session() as s:
        rows = s.scalars(select(ApiKey)).all()
    stored = " ".join(f"{r.prefix} {r.key_hash} {r.name}" for r in rows)
    for name, key in keys.items():
        if key.startswith("graft_"):
            assert key not in stored
            assert hashlib.sha256(key.encode()).hexdigest() in stored
            assert len(key) >= len("graft_") + 43  # 256 bits, base64url


def test_the_operator_reaches_projects_but_not_their_data(world):
    """The operator manages every project (keys, quotas) but is no member of any: B's datasets, jobs
    and models answer it 404 like any other project's, and stay as they were."""
    client, keys, ids, db = world
    before = snapshot(db, keys["b-project"])
    op = {"Authorization": f"Bearer {keys['operator']}"}
    for method, path in operations(client.app):
        if (method, path) == ("DELETE", "/v1/projects/{project_id}"):
            continue  # deleting B is test_tenants' business
        resp = client.request(method, fill(path, ids), headers=op, **request_kwargs(method, path, ids))
        if "/projects" in path or path.startswith("/v1/keys"):
            assert resp.status_code < 400, (method, path, resp.status_code, resp.text)
        elif "{" in path or (method, path) == ("POST", "/v1/jobs"):
            assert resp.status_code == 404, (method, path, resp.status_code, resp.text)
        else:
            assert resp.status_code < 400, (method, path, resp.text)
    after = snapshot(db, keys["b-project"])
    assert {k: v for k, v in after.items() if k != "keys"} == {k: v for k, v in before.items() if k != "keys"}
    assert len(after["keys"]) == len(before["keys"]) + 1  # the operator made one, and revoked B's admin key
    assert dict(after["keys"])[keys["b-admin-id"]] is not None


def test_only_the_operator_creates_projects_and_keys_are_shown_once(world):
    client, keys, ids, db = world
    a = {"Authorization": f"Bearer {keys['a-admin']}"}
    refused = client.post("/v1/projects", json={"name": "team-c", "quotas": {"max_datasets": 0}}, headers=a)
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    op = {"Authorization": f"Bearer {keys['operator']}"}
    created = client.post("/v1/projects", json={"name": "team-c", "quotas": {"max_datasets": 3}}, headers=op)
    assert created.status_code == 201
    c_key = created.json()["admin_key"]["key"]
    c = {"Authorization": f"Bearer {c_key}"}
    assert [p["name"] for p in client.get("/v1/projects", headers=c).json()] == ["team-c"]
    assert client.get("/v1/datasets", headers=c).json() == []
    listed = client.get(f"/v1/projects/{created.json()['project']['id']}/keys", headers=c).json()
    assert len(listed) == 1 and "key" not in listed[0] and c_key.startswith(listed[0]["prefix"])
    assert client.post("/v1/projects", json={"name": "team-c"}, headers=op).status_code == 409
    assert client.post("/v1/projects", json={"name": "team-c"}, headers=a).status_code == 403  # not a word on names


def test_quota_and_rate_limit_answers(secured):
    settings = secured.model_copy(update={"max_concurrent_jobs": 1, "predict_rate_per_minute": 2})
    db = Database(settings.database_url)
    with db.session() as s:
        project = create_project(s, "quota")
        _, key = create_key(s, project.id, "k", "admin")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings)) as client:
        ds = client.post("/v1/datasets", files={"file": ("q.zip", subset_zip(2, 1))}, headers=headers).json()
        assert client.post("/v1/jobs", json={"dataset_id": ds["id"]}, headers=headers).status_code == 202
        second = client.post("/v1/jobs", json={"dataset_id": ds["id"]}, headers=headers)
        assert second.status_code == 429 and int(second.headers["retry-after"]) > 0
        assert "limit" in second.json()["detail"]
        answers = [client.post("/v1/models/nope/predict", headers=headers, files={"file": ("x.png", png())})
                   for _ in range(3)]
        assert [r.status_code for r in answers] == [404, 404, 429]
        assert int(answers[-1].headers["retry-after"]) >= 1
    db.dispose()


def test_open_mode_is_loud_and_refused_off_loopback(settings):
    with TestClient(create_app(settings)) as client:
        health = client.get("/healthz").json()
        assert health["auth"] == "open" and "WITHOUT API keys" in health["warning"]
        assert client.get("/v1/datasets").status_code == 200
    exposed = settings.model_copy(update={"host": "0.0.0.0"})
    assert not auth_is_open(exposed)  # off loopback, keys are required unless said otherwise
    with pytest.raises(SystemExit, match="refusing"):
        check_exposure(exposed.model_copy(update={"auth_required": False}))
    check_exposure(exposed.model_copy(update={"auth_required": False, "allow_open_network": True}))
    check_exposure(exposed)


def test_openapi_declares_the_bearer_scheme(settings):
    schema = create_app(settings).openapi()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": "A Graft API key: `Authorization: Bearer graft_...`"}
    assert {"ApiKey": []} in schema["paths"]["/v1/datasets"]["post"]["security"]


def test_storage_quota_refuses_uploads_past_it_and_keeps_nothing(secured):
    db = Database(secured.database_url)
    with db.session() as s:
        project = create_project(s, "small", quotas={"max_stored_bytes": 1_000_000})
        _, key = create_key(s, project.id, "k", "train")
    headers = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(secured)) as client:
        first = client.post("/v1/datasets", files={"file": ("a.zip", subset_zip(2, 1))}, headers=headers)
        assert first.status_code == 201, first.text
        again = client.post("/v1/datasets", files={"file": ("b.zip", subset_zip(6, 3))}, headers=headers)
        assert again.status_code == 403 and "quota" in again.json()["detail"]
        assert [d["id"] for d in client.get("/v1/datasets", headers=headers).json()] == [first.json()["id"]]
    db.dispose()
