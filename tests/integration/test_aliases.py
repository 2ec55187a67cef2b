"""Aliases through a real server: CRUD and the history of every move, predict by alias, promotion
under concurrent predicts, keys limited to aliases, other projects' aliases, bad names and models."""
from __future__ import annotations

import itertools
import json
import threading
import time
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select

from service.api.auth import create_key, create_project
from service.app import create_app
from service.client import GraftClient
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
    c, m2 = world["c"]["alpha-predict"], world["models"][1]
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

    settings = world["settings"]
    server_env = {"GRAFT_DATABASE_URL": settings.database_url, "GRAFT_DATA_DIR": str(settings.data_dir)}
    create = ["keys", "create", "--project", "alpha", "--scope", "predict", "--alias"]
    made = runner.invoke(cli.app, [*create, "cli-prod"], env=server_env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    with httpx.Client(base_url=env["GRAFT_URL"], headers={"Authorization": f"Bearer {key}"}, timeout=60) as limited:
        assert predict(limited, "/v1/aliases/cli-prod/predict").json()["model_id"] == m2
        assert predict(limited, f"/v1/models/{m2}/predict").status_code == 403
    with GraftClient(env["GRAFT_URL"], key) as client:  # what `graft` and scripts use
        answer = client.predict_alias("cli-prod", [hymenoptera_files("val", "ants")[0]])
    assert answer["alias"] == "cli-prod" and answer["model_id"] == m2 and len(answer["results"]) == 1
    missing = runner.invoke(cli.app, [*create, "cli-nope"], env=server_env)
    assert missing.exit_code != 0 and "no alias named 'cli-nope'" in missing.output


def test_migration_0006_matches_the_tables_and_goes_both_ways(any_db_settings):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine, inspect

    from service.store.db import Base
    from service.store.migrate import alembic_config

    engine = create_engine(any_db_settings.database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    mine = [d for d in diffs if any(n in repr(d) for n in ("model_alias", "alias_move", "'aliases'"))]
    assert not mine, mine
    cfg = alembic_config(any_db_settings.database_url)
    command.downgrade(cfg, "0005_tenants")
    tables = inspect(engine).get_table_names()
    assert "model_alias" not in tables and "alias_move" not in tables
    assert "aliases" not in [c["name"] for c in inspect(engine).get_columns("api_key")]
    command.upgrade(cfg, "heads")
    assert {"model_alias", "alias_move"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_concurrent_moves_of_one_alias_keep_a_consistent_history(any_db_settings):
    """Threads moving one alias at once on a real database: each move is one history row whose
    `from` is the previous row's `to` (none lost or interleaved); a lost creation race is a 409."""
    from service.errors import Conflict
    from service.store import aliases
    from service.store.tables import Dataset, Job, Model

    db = Database(any_db_settings.database_url)
    with db.session() as s:
        ids = []
        s.add(Dataset(id="d", name="d", classes=[], class_counts={}, split_counts={}, num_images=0,
                      has_val_split=False, rejected=[]))
        for n in range(3):
            s.add(Job(id=f"j{n}", dataset_id="d", config={}))
            s.flush()
            s.add(Model(id=f"m{n}", job_id=f"j{n}", dataset_id="d", backbone="b", classes=[], metrics={},
                        recipe={}, artifact_dir="x", sha256="0" * 64, size_bytes=1))
            ids.append(f"m{n}")
    outcomes = []

    def mover(n: int) -> None:
        for i in range(6):
            try:
                with db.session() as s:
                    aliases.move(s, "default", "race", s.get(Model, ids[(n + i) % 3]), None)
                outcomes.append("moved")
            except Conflict:
                outcomes.append("conflict")

    threads = [threading.Thread(target=mover, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with db.session() as s:
        moves = aliases.history(s, "default", "race")
        final = aliases.find(s, "default", "race").model_id
    db.dispose()
    assert len(outcomes) == 18 and outcomes.count("conflict") <= 2  # only the first moves can race
    assert moves[0].from_model_id is None
    assert all(a.to_model_id == b.from_model_id for a, b in itertools.pairwise(moves))
    assert moves[-1].to_model_id == final


def test_deleting_a_project_removes_its_aliases_and_their_history(any_db_settings):
    """An alias points at a model by a foreign key: the project goes in one transaction regardless."""
    from service.store import aliases
    from service.store.projects import delete_project_rows
    from service.store.tables import AliasMove, Dataset, Job, Model, ModelAlias, Project

    db = Database(any_db_settings.database_url)
    with db.session() as s:
        for name in ("gone", "kept"):
            pid = create_project(s, name).id
            s.add(Dataset(id=f"d-{name}", project_id=pid, name="d", classes=[], class_counts={}, split_counts={},
                          num_images=0, has_val_split=False, rejected=[]))
            s.add(Job(id=f"j-{name}", project_id=pid, dataset_id=f"d-{name}", config={}))
            s.flush()
            model = Model(id=f"m-{name}", project_id=pid, job_id=f"j-{name}", dataset_id=f"d-{name}", backbone="b",
                          classes=[], metrics={}, recipe={}, artifact_dir="x", sha256="0" * 64, size_bytes=1)
            s.add(model)
            s.flush()
            aliases.move(s, pid, "prod", model, None)
    with db.session() as s:
        delete_project_rows(s, s.scalar(select(Project).where(Project.name == "gone")))
    with db.session() as s:
        left = [(a.project_id, a.name) for a in s.scalars(select(ModelAlias))]
        moves = s.scalars(select(AliasMove.to_model_id)).all()
    db.dispose()
    assert len(left) == 1 and moves == ["m-kept"]
