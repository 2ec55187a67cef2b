"""Aliases through a real server: CRUD and the history of every move, predict by alias, promotion
under concurrent predicts, keys limited to aliases, other projects' aliases, bad names and models."""
from __future__ import annotations

import json
import threading
import time
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select

from service.api.auth import create_key, create_project
from service.app import create_app
from service.serving.model_cache import ModelCache
from service.settings import Settings
from service.store.db import Database
from service.store.migrate import upgrade
from service.store.tables import Webhook, WebhookDelivery
from tests.support.data import hymenoptera_files, subset_zip
from tests.support.live import uvicorn_thread
from workers.worker import Worker

TINY_JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A keyed server with projects alpha (two trained models, one queued job) and beta; a dict of
    clients by key name, the model ids, the app and its database."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("aliases") / "data", auth_required=True,
                        min_images_per_class=2, heartbeat_interval_s=0.5, poll_interval_s=0.1)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    db = Database(settings.database_url)
    keys = {}
    with db.session() as s:
        for project_name in ("alpha", "beta"):
            project = create_project(s, project_name)
            keys[f"{project_name}-project"] = project.id
            for scope in ("admin", "train", "predict"):
                row, plain = create_key(s, project.id, scope, scope)
                keys[f"{project_name}-{scope}"], keys[f"{project_name}-{scope}-id"] = plain, row.id
    app = create_app(settings)
    with uvicorn_thread(app) as url:
        clients = {name: httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"})
                   for name, key in keys.items() if not name.endswith(("-id", "-project"))}
        train = clients["alpha-train"]
        dataset = train.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(3, 2))}).json()
        jobs = [train.post("/v1/jobs", json={"dataset_id": dataset["id"], **TINY_JOB, "epochs": n}).json()
                for n in (1, 2)]
        worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 2}, daemon=True)
        worker.start()
        worker.join(240)
        models = [train.get(f"/v1/jobs/{j['id']}").json()["model_id"] for j in jobs]
        assert all(models), models
        queued = train.post("/v1/jobs", json={"dataset_id": dataset["id"], **TINY_JOB}).json()  # no worker left
        yield {"c": clients, "keys": keys, "models": models, "queued_job": queued["id"], "app": app, "db": db,
               "settings": settings}
        for client in clients.values():
            client.close()
    db.dispose()


def image(n: int = 0) -> tuple[str, bytes]:
    path = hymenoptera_files("val", "bees")[n]
    return path.name, path.read_bytes()


def predict(client: httpx.Client, path: str) -> httpx.Response:
    return client.post(path, files=[("file", image())])


def test_move_get_list_delete_and_history(world):
    c, (m1, m2) = world["c"]["alpha-train"], world["models"]
    key_id = world["keys"]["alpha-train-id"]
    app = world["app"]
    app.state.model_cache = ModelCache(world["settings"], 512 * 1024**2)  # empty: see the move load it
    put = c.put("/v1/aliases/staging", json={"model_id": m1})
    assert put.status_code == 200, put.text
    assert put.json()["name"] == "staging" and put.json()["model_id"] == m1
    assert m1 in app.state.model_cache.ids()  # loaded before the alias pointed at it
    assert c.put("/v1/aliases/staging", json={"model_id": m2}).json()["model_id"] == m2
    assert c.put("/v1/aliases/staging", json={"model_id": m2}).status_code == 200  # no move: not in history
    assert c.get("/v1/aliases/staging").json()["model_id"] == m2
    assert "staging" in [a["name"] for a in c.get("/v1/aliases").json()]
    assert c.delete("/v1/aliases/staging").status_code == 200
    assert c.get("/v1/aliases/staging").status_code == 404
    assert predict(c, "/v1/aliases/staging/predict").status_code == 404
    history = c.get("/v1/aliases/staging/history").json()
    assert [(h["from_model_id"], h["to_model_id"]) for h in history] == [(None, m1), (m1, m2), (m2, None)]
    assert {h["key_id"] for h in history} == {key_id}
    times = [h["moved_at"] for h in history]
    assert times == sorted(times) and all(times)


def test_predict_by_alias_names_the_model_and_answers_as_by_id(world):
    c, (m1, m2) = world["c"]["alpha-predict"], world["models"]
    world["c"]["alpha-train"].put("/v1/aliases/named", json={"model_id": m2})
    by_alias, by_id = predict(c, "/v1/aliases/named/predict"), predict(c, f"/v1/models/{m2}/predict")
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json() == {**by_id.json(), "alias": "named"}
    assert by_alias.json()["model_id"] == m2


def test_alias_moved_enqueues_a_webhook_event(world):
    with world["db"].session() as s:
        hook = Webhook(project_id=world["keys"]["alpha-project"], url="http://127.0.0.1:9/hook",
                       events=["alias.moved"], secret="s" * 32)
        s.add(hook)
        s.flush()
        hook_id = hook.id
    m1, m2 = world["models"]
    c = world["c"]["alpha-train"]
    c.put("/v1/aliases/hooked", json={"model_id": m1})
    c.put("/v1/aliases/hooked", json={"model_id": m2})
    with world["db"].session() as s:
        bodies = [json.loads(d.body) for d in s.scalars(select(WebhookDelivery).where(
            WebhookDelivery.webhook_id == hook_id).order_by(WebhookDelivery.created_at))]
        s.delete(s.get(Webhook, hook_id))
    assert [(b["event"], b["data"]["alias"], b["data"]["from_model_id"], b["data"]["to_model_id"])
            for b in bodies] == [("alias.moved", "hooked", None, m1), ("alias.moved", "hooked", m1, m2)]


def test_promotion_under_concurrent_predicts(world):
    """Clients predict through `live` while it moves between two models: every answer is a 200
    naming a model the alias pointed at during that request."""
    m1, m2 = world["models"]
    mover, clients = world["c"]["alpha-train"], [world["c"]["alpha-predict"]] * 4
    assert mover.put("/v1/aliases/live", json={"model_id": m1}).status_code == 200
    moves = [(0.0, time.monotonic(), m1)]  # (sent, answered, target)
    answers = []  # (sent, answered, status, model_id)
    stop = threading.Event()

    def client_loop(client):
        while not stop.is_set():
            sent = time.monotonic()
            resp = predict(client, "/v1/aliases/live/predict")
            answers.append((sent, time.monotonic(), resp.status_code,
                            resp.json().get("model_id") if resp.status_code == 200 else resp.text))

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for i in range(12):
        target = (m2, m1)[i % 2]
        sent = time.monotonic()
        assert mover.put("/v1/aliases/live", json={"model_id": target}).status_code == 200
        moves.append((sent, time.monotonic(), target))
        time.sleep(0.25)  # most requests then fall between two moves, where only one model is right
    stop.set()
    for t in threads:
        t.join(60)

    def pointed_at(start: float, end: float) -> set[str]:
        """The targets the alias may have had during [start, end]: the last move answered before it
        started, and every move whose request overlapped it."""
        before = [m for m in moves if m[1] <= start]
        overlapping = {m[2] for m in moves if m[0] <= end and m[1] >= start}
        return {before[-1][2]} | overlapping if before else overlapping

    assert len(answers) >= 20
    assert sum(len(pointed_at(a[0], a[1])) == 1 for a in answers) >= 5  # some had one right answer only
    assert all(status == 200 for _, _, status, _ in answers), [a for a in answers if a[2] != 200][:3]
    wrong = [a for a in answers if a[3] not in pointed_at(a[0], a[1])]
    assert not wrong, wrong[:3]
    assert {a[3] for a in answers} == {m1, m2}  # both served: the moves were seen


def test_key_limited_to_an_alias(world):
    admin, train = world["c"]["alpha-admin"], world["c"]["alpha-train"]
    m1, m2 = world["models"]
    train.put("/v1/aliases/canary", json={"model_id": m1})
    train.put("/v1/aliases/stable", json={"model_id": m2})
    project_id = world["keys"]["alpha-project"]
    made = admin.post(f"/v1/projects/{project_id}/keys",
                      json={"name": "canary-only", "scope": "predict", "aliases": ["canary"]})
    assert made.status_code == 201, made.text
    assert made.json()["aliases"] == ["canary"]
    with httpx.Client(base_url=str(admin.base_url), headers={"Authorization": f"Bearer {made.json()['key']}"},
                      timeout=60) as limited:
        through = predict(limited, "/v1/aliases/canary/predict")
        assert through.status_code == 200 and through.json()["model_id"] == m1
        by_id = predict(limited, f"/v1/models/{m1}/predict")
        assert by_id.status_code == 403 and "canary" in by_id.json()["detail"]
        other = predict(limited, "/v1/aliases/stable/predict")
        assert other.status_code == 403 and "canary" in other.json()["detail"]
    for bad in ({"aliases": ["does-not-exist"]}, {"aliases": ["canary"], "scope": "train"},
                {"aliases": ["Bad/Name"]}, {"aliases": []}):
        resp = admin.post(f"/v1/projects/{project_id}/keys", json={"name": "x", "scope": "predict", **bad})
        assert resp.status_code == 422, (bad, resp.text)
        assert resp.headers["content-type"].startswith("application/problem+json")
    missing = admin.post(f"/v1/projects/{project_id}/keys",
                         json={"name": "x", "scope": "predict", "aliases": ["canary", "does-not-exist"]})
    assert "does-not-exist" in missing.json()["detail"]


def test_another_projects_aliases_are_not_found(world):
    m1, _ = world["models"]
    world["c"]["alpha-train"].put("/v1/aliases/private", json={"model_id": m1})
    beta = world["c"]["beta-train"]
    assert beta.get("/v1/aliases/private").status_code == 404
    assert beta.get("/v1/aliases/private/history").status_code == 404
    assert beta.delete("/v1/aliases/private").status_code == 404
    assert predict(beta, "/v1/aliases/private/predict").status_code == 404
    assert "private" not in [a["name"] for a in beta.get("/v1/aliases").json()]
    assert beta.put("/v1/aliases/mine", json={"model_id": m1}).status_code == 404  # alpha's model
    assert world["c"]["alpha-train"].get("/v1/aliases/private").json()["model_id"] == m1  # untouched


@pytest.mark.parametrize("name", ["a/b", "Prod", "-x", "x" * 64, "ünï", "a b"])
def test_bad_alias_names_are_refused_with_the_rule(world, name):
    m1, _ = world["models"]
    resp = world["c"]["alpha-train"].put(f"/v1/aliases/{quote(name, safe='')}", json={"model_id": m1})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert "lowercase letters, digits" in resp.json()["detail"]


def test_bad_models_are_refused_like_predict(world):
    c = world["c"]["alpha-train"]
    assert c.put("/v1/aliases/x", json={"model_id": "0" * 32}).status_code == 404
    queued = c.put("/v1/aliases/x", json={"model_id": world["queued_job"]})
    assert queued.status_code == 409 and "not ready" in queued.json()["detail"]
    assert c.put("/v1/aliases/x", json={}).status_code == 422
    assert c.put("/v1/aliases/x", json={"model_id": world["models"][0], "extra": 1}).status_code == 422
    assert c.get("/v1/aliases/x").status_code == 404  # none of these created it
    assert world["c"]["alpha-predict"].put("/v1/aliases/x", json={"model_id": world["models"][0]}).status_code == 403


def test_cli_promotes_lists_and_shows_history(world):
    from typer.testing import CliRunner

    from service import cli

    m1, m2 = world["models"]
    env = {"GRAFT_URL": str(world["c"]["alpha-train"].base_url), "GRAFT_API_KEY": world["keys"]["alpha-train"]}
    runner = CliRunner()
    for model_id in (m1, m2):
        promoted = runner.invoke(cli.app, ["models", "promote", model_id, "cli-prod"], env=env)
        assert promoted.exit_code == 0, promoted.output
        assert f"cli-prod -> model {model_id}" in promoted.output
    listed = runner.invoke(cli.app, ["models", "aliases", "--json"], env=env)
    assert {"name": "cli-prod", "model_id": m2}.items() <= {
        a["name"]: a for a in json.loads(listed.stdout)}["cli-prod"].items()
    moves = json.loads(runner.invoke(cli.app, ["models", "aliases", "cli-prod", "--json"], env=env).stdout)
    assert [(m["from_model_id"], m["to_model_id"]) for m in moves] == [(None, m1), (m1, m2)]
    refused = runner.invoke(cli.app, ["models", "promote", m1, "no/slash"], env=env)
    assert refused.exit_code != 0 and refused.exception.status == 422  # `graft` prints its detail
    assert "lowercase letters" in refused.exception.detail
