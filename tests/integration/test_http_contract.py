"""What the OpenAPI document and the error answers promise a client: allowed methods, accepted media
types, file fields and binary bodies, /readyz, and one rule for every Authorization header."""
from __future__ import annotations

import shutil

import pytest
from fastapi.testclient import TestClient

from service.api.auth import create_key, create_project
from service.api.schemas import Readiness
from service.app import create_app
from service.store.db import Database
from service.store.queue import JobQueue
from service.store.tables import DEFAULT_PROJECT_ID
from tests.support.data import subset_zip

PROBLEM = "application/problem+json"
# (an Authorization header that is no valid key, the secret in it that must never be echoed)
NOT_A_KEY = [("Bearer graft_made_up", "graft_made_up"), ("Bearer ", None), ("Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
             ("graft_pasted_without_scheme", "graft_pasted_without_scheme"), ("", None), ("Bearer", None)]


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("method, path, allowed", [
    ("DELETE", "/v1/datasets", "GET, POST"),  # two routes share the path: both are named
    ("PUT", "/v1/datasets/some-id/images", "GET, POST, PATCH"),
    ("POST", "/healthz", "GET"),
    ("PATCH", "/v1/models/some-id/export", "GET"),
])
def test_405_names_every_method_the_path_answers(client, method, path, allowed):
    resp = client.request(method, path)
    assert resp.status_code == 405 and resp.headers["content-type"].startswith(PROBLEM)
    assert resp.headers["allow"] == allowed


def test_415_says_which_media_type_is_accepted(client):
    resp = client.post("/v1/datasets", content=b"{}", headers={"content-type": "application/json"})
    assert resp.status_code == 415 and resp.headers["accept"] == "multipart/form-data"


@pytest.mark.parametrize("required", [False, True], ids=["open", "keys-required"])
def test_every_authorization_header_is_judged_alike_in_both_modes(settings, required):
    """Open mode lets a request without credentials in; a request with any Authorization header is
    checked exactly as when keys are required: a valid key is its project, anything else a 401."""
    settings = settings.model_copy(update={"auth_required": required, "min_images_per_class": 2})
    db = Database(settings.database_url)
    with db.session() as s:
        _, key = create_key(s, create_project(s, "team").id, "k", "admin")
    db.dispose()
    with TestClient(create_app(settings)) as client:
        anonymous = client.get("/v1/datasets")
        assert anonymous.status_code == (401 if required else 200)
        mine = {"Authorization": f"Bearer {key}"}
        assert client.post("/v1/datasets", files={"file": ("t.zip", subset_zip(2, 1))}, headers=mine).status_code == 201
        assert len(client.get("/v1/datasets", headers=mine).json()) == 1  # its own project, not the default
        if not required:
            assert client.get("/v1/datasets").json() == []
        for header, secret in NOT_A_KEY:
            resp = client.get("/v1/datasets", headers={"Authorization": header})
            assert resp.status_code == 401, (header, resp.text)
            assert resp.headers["content-type"].startswith(PROBLEM) and resp.headers["www-authenticate"] == "Bearer"
            assert "key" in resp.json()["detail"]
            assert secret is None or secret not in resp.text
        assert "Authorization header" in client.get("/openapi.json").json()["info"]["description"]


def test_file_fields_and_binary_bodies_are_declared_for_generators(client):
    document = client.get("/openapi.json").json()
    components = document["components"]["schemas"]

    def file_field(path: str, method: str = "post") -> dict:
        body = document["paths"][path][method]["requestBody"]["content"]["multipart/form-data"]["schema"]
        return components[body["$ref"].rsplit("/", 1)[-1]]["properties"]["file"]

    single = file_field("/v1/datasets")
    assert single["type"] == "string" and single["format"] == "binary" and "contentMediaType" in single
    for path in ("/v1/datasets/{dataset_id}/images", "/v1/models/{model_id}/predict"):
        many = file_field(path)
        assert many["type"] == "array" and many["minItems"] == 1
        assert many["items"]["format"] == "binary" and "contentMediaType" in many["items"]
    export = document["paths"]["/v1/models/{model_id}/export"]["get"]["responses"]["200"]["content"]
    assert export == {"application/zip": {"schema": {"type": "string", "format": "binary"}}}


def test_readyz_answers_as_declared(client, settings):
    responses = client.get("/openapi.json").json()["paths"]["/readyz"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}
    assert responses["503"]["content"][PROBLEM]["schema"] == {"$ref": "#/components/schemas/Problem"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and Readiness.model_validate(ready.json()).status == "ready"
    shutil.rmtree(settings.models_dir)
    broken = client.get("/readyz")
    assert broken.status_code == 503 and broken.headers["content-type"].startswith(PROBLEM)
    assert "artifact_store" in broken.json()["detail"] and broken.json()["checks"]["database"]["ok"]


def test_a_write_is_committed_before_its_answer_is_sent(any_db_settings):
    """A client that is told 202 may read the job at once: at the moment the answer starts, another
    connection already sees the row (it did not when the session committed after the response)."""
    settings = any_db_settings.model_copy(update={"min_images_per_class": 2})
    app = create_app(settings)
    seen_at_answer: list[int] = []

    async def watching(scope, receive, send):
        async def send_and_look(message):
            if (scope["type"] == "http" and (scope["method"], scope["path"]) == ("POST", "/v1/jobs")
                    and message["type"] == "http.response.start"):
                other = Database(settings.database_url)
                with other.session(readonly=True) as s:
                    seen_at_answer.append(len(JobQueue.list_jobs(s, DEFAULT_PROJECT_ID)))
                other.dispose()
            await send(message)
        await app(scope, receive, send_and_look)

    with TestClient(watching) as client:
        dataset = client.post("/v1/datasets", files={"file": ("t.zip", subset_zip(2, 1))}).json()
        for n in (1, 2):
            job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe"})
            assert job.status_code == 202, job.text
            assert client.get(f"/v1/jobs/{job.json()['id']}").status_code == 200
            assert seen_at_answer[-1] == n
