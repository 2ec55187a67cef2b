"""Batch predictions through the API and real workers: each image's result is /predict's answer,
a worker killed mid-run is resumed without predicting an image twice, cancel, other projects'
batches are not found, bad input is a clear 4xx."""
from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest

from service.api.auth import create_key
from service.store.blobs import BlobStore
from service.store.db import Database
from service.store.tables import Project
from tests.integration.test_worker_pool import Workers
from tests.support.data import hymenoptera_files, make_zip
from tests.support.training import api_with_trained_probe
from workers.worker import Worker


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(settings, client, training dataset, succeeded training job) on SQLite."""
    with api_with_trained_probe(tmp_path_factory.mktemp("batch") / "data") as ctx:
        yield ctx


def run_one_job(settings) -> None:
    thread = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    thread.join(120)


def wait_status(client, batch_id: str, statuses: tuple[str, ...], timeout: float = 120, **headers) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.get(f"/v1/batch-predictions/{batch_id}", headers=headers).json()
        if batch["status"] in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.05)


def jsonl_rows(client, batch_id: str) -> list[dict]:
    resp = client.get(f"/v1/batch-predictions/{batch_id}/results.jsonl")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson", resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    return resp.json()


def test_a_batch_over_a_dataset_gives_each_image_what_predict_gives(trained):
    settings, client, dataset, job = trained
    created = client.post(f"/v1/models/{job['model_id']}/batch-predictions",
                          json={"dataset_id": dataset["id"], "top_k": 5})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["status"] == "queued" and batch["top_k"] == 2  # capped at the model's 2 classes
    assert batch["progress"] == {"done": 0, "total": dataset["num_images"]}
    assert problem(client.get(batch["links"]["results_csv"]), 409)["job_status"] == "queued"
    run_one_job(settings)
    batch = client.get(batch["links"]["self"]).json()
    assert batch["status"] == "succeeded", batch
    assert batch["progress"] == {"done": dataset["num_images"], "total": dataset["num_images"]}

    rows = jsonl_rows(client, batch["id"])
    images = client.get(f"/v1/datasets/{dataset['id']}/images", params={"limit": 1000}).json()
    assert [(r["image"], r["sha256"]) for r in rows] == [(i["original_name"], i["id"]) for i in images]
    blobs = BlobStore(settings.blobs_dir)
    answer = client.post(f"/v1/models/{job['model_id']}/predict", params={"top_k": 2},
                         files=[("file", (r["image"], blobs.read(r["sha256"]))) for r in rows]).json()
    for row, expected in zip(rows, answer["results"], strict=True):
        assert [p["label"] for p in row["predictions"]] == [p["label"] for p in expected["predictions"]]
        for got, want in zip(row["predictions"], expected["predictions"]):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)

    table = list(csv.reader(io.StringIO(client.get(batch["links"]["results_csv"]).text)))
    assert table[0] == ["image", "sha256", "label_1", "score_1", "label_2", "score_2"]
    assert [(r[0], r[1], r[2], float(r[3])) for r in table[1:]] == [
        (r["image"], r["sha256"], r["predictions"][0]["label"], r["predictions"][0]["score"]) for r in rows]


def test_an_uploaded_zip_is_checked_like_any_upload_and_predicted_by_path(trained):
    settings, client, _, job = trained
    ants, bees = hymenoptera_files("val", "ants")[:2], hymenoptera_files("val", "bees")[:1]
    entries = {f"shots/{p.name}": p.read_bytes() for p in ants} | {f"more/{bees[0].name}": bees[0].read_bytes(),
                                                                  "notes.txt": b"not an image", ".DS_Store": b"x"}
    created = client.post(f"/v1/models/{job['model_id']}/batch-predictions", data={"top_k": "1"},
                          files={"file": ("pics.zip", make_zip(entries))})
    assert created.status_code == 202, created.text
    batch = created.json()
    assert batch["progress"]["total"] == 3 and batch["top_k"] == 1
    report = client.get(f"/v1/datasets/{batch['dataset_id']}/report").json()
    assert {r["path"] for r in report["rejected"]} == {"notes.txt", ".DS_Store"}
    assert report["trainable"] is False  # unlabeled: predicted, never trained on
    run_one_job(settings)
    rows = jsonl_rows(client, batch["id"])
    assert [r["image"] for r in rows] == [f"shots/{ants[0].name}", f"shots/{ants[1].name}", f"more/{bees[0].name}"]
    assert all(len(r["predictions"]) == 1 for r in rows)


def test_cancel_through_delete_or_the_jobs_api(trained):
    _, client, dataset, job = trained
    url = f"/v1/models/{job['model_id']}/batch-predictions"
    first = client.post(url, json={"dataset_id": dataset["id"]}).json()
    second = client.post(url, json={"dataset_id": dataset["id"]}).json()
    assert client.delete(first["links"]["self"]).json()["status"] == "cancelled"
    assert client.post(f"/v1/jobs/{second['id']}/cancel").json()["status"] == "cancelled"
    assert client.get(second["links"]["self"]).json()["status"] == "cancelled"
    assert "cancelled" in problem(client.get(first["links"]["results_jsonl"]), 409)["detail"]
    problem(client.delete(first["links"]["self"]), 409)


def test_other_projects_batches_and_datasets_are_not_found(trained):
    settings, client, dataset, job = trained
    batch = client.post(f"/v1/models/{job['model_id']}/batch-predictions", json={"dataset_id": dataset["id"]}).json()
    client.delete(batch["links"]["self"])
    db = Database(settings.database_url)
    with db.session() as s:
        s.add(Project(id="otherproject", name="other", name_key="other"))
        s.flush()
        _, key = create_key(s, "otherproject", "k", "admin")
    db.dispose()
    stranger = {"Authorization": f"Bearer {key}"}
    for path in (batch["links"]["self"], batch["links"]["results_csv"]):
        assert problem(client.get(path, headers=stranger), 404)["detail"] == f"no job with id {batch['id']!r}"
    problem(client.delete(batch["links"]["self"], headers=stranger), 404)
    problem(client.post(f"/v1/models/{job['model_id']}/batch-predictions", json={"dataset_id": dataset["id"]},
                        headers=stranger), 404)
    # A training job is not a batch prediction, even in its own project.
    problem(client.get(f"/v1/batch-predictions/{job['id']}"), 404)
    # A predict key limited to aliases may not predict by model id, in batches either.
    assert client.put("/v1/aliases/batch-prod", json={"model_id": job["model_id"]}).status_code in (200, 201)
    db = Database(settings.database_url)
    with db.session() as s:
        _, limited = create_key(s, "default", "app", "predict", aliases=["batch-prod"])
    db.dispose()
    refused = problem(client.post(f"/v1/models/{job['model_id']}/batch-predictions", json={"dataset_id": dataset["id"]},
                                  headers={"Authorization": f"Bearer {limited}"}), 403)
    assert "only through the alias" in refused["detail"]


@pytest.mark.parametrize("body, status, says", [
    ({"dataset_id": "0" * 32}, 404, "no dataset with id"),
    ({"dataset_id": "DATASET", "top_k": 0}, 422, "top_k"),
    ({"dataset_id": "DATASET", "top_k": 1001}, 422, "top_k"),
    ({}, 422, "say what to predict"),
    ({"dataset_id": "DATASET", "colour": "red"}, 422, "colour"),
])
def test_bad_requests_say_what_is_wrong(trained, body, status, says):
    _, client, dataset, job = trained
    body = {k: dataset["id"] if v == "DATASET" else v for k, v in body.items()}
    resp = client.post(f"/v1/models/{job['model_id']}/batch-predictions", json=body)
    assert says in problem(resp, status)["detail"]


def test_bad_models_and_uploads_are_refused(trained):
    _, client, dataset, job = trained
    body = {"dataset_id": dataset["id"]}
    assert "no model" in problem(client.post("/v1/models/nosuchmodel/batch-predictions", json=body), 404)["detail"]
    queued = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe",
                                           "image_size": 64, "epochs": 1}).json()
    not_ready = problem(client.post(f"/v1/models/{queued['id']}/batch-predictions", json=body), 409)
    assert not_ready["job_status"] == "queued"
    client.post(f"/v1/jobs/{queued['id']}/cancel")
    url = f"/v1/models/{job['model_id']}/batch-predictions"
    empty = problem(client.post(url, files={"file": ("empty.zip", make_zip({}))}), 422)
    assert "no usable images" in empty["detail"]
    only_text = problem(client.post(url, files={"file": ("t.zip", make_zip({"a.txt": b"hello"}))}), 422)
    assert only_text["rejected"][0]["path"] == "a.txt"
    problem(client.post(url, files={"file": ("x.zip", b"not a zip")}), 422)
    problem(client.post(url, content=b"dataset_id=x", headers={"content-type": "text/plain"}), 415)


@pytest.mark.e2e
def test_a_worker_killed_mid_batch_is_resumed_and_every_image_is_written_once(trained):
    """Two real `graft worker`s, predicting one image per step: the one running the batch is
    SIGKILLed after some checkpoints and the other resumes from the last one: every image once,
    in order, the second attempt going on from the checkpoint."""
    settings, client, _, job = trained
    files = [p for split in ("train", "val") for label in ("ants", "bees") for p in hymenoptera_files(split, label)[:25]]
    workers = Workers(settings)
    try:
        # Both start now (most of this test is their start-up): whichever claims the batch is killed.
        procs = {proc.pid: proc for proc in (workers.start(**SLOW) for _ in range(2))}
        deadline = time.monotonic() + 120
        while len(client.get("/v1/workers").json()) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.2)
        created = client.post(f"/v1/models/{job['model_id']}/batch-predictions",
                              files={"file": ("many.zip", make_zip({f"{i:03d}-{p.name}": p.read_bytes()
                                                                    for i, p in enumerate(files)}))}).json()
        while (client.get(f"/v1/jobs/{created['id']}").json()["checkpoint_epoch"] or 0) < 10:
            assert time.monotonic() < deadline, "no checkpoint was recorded"
            time.sleep(0.1)
        running = [e for e in client.get(f"/v1/jobs/{created['id']}/events").json()
                   if e["data"].get("status") == "running"]
        victim = procs[int(running[0]["data"]["worker_id"].split(":")[1])]  # host:pid:suffix
        victim.kill()
        victim.wait(30)
        killed_at = client.get(f"/v1/jobs/{created['id']}").json()["checkpoint_epoch"]  # images checkpointed
        assert killed_at < len(files), "the batch finished before the kill: make it slower"
        batch = wait_status(client, created["id"], ("succeeded", "failed"), timeout=120)
    finally:
        workers.stop_all()
    assert batch["status"] == "succeeded" and batch["attempts"] == 2, batch
    events = client.get(f"/v1/jobs/{created['id']}/events").json()
    resumed = [e["data"]["done"] for e in events if e["kind"] == "resumed"]
    assert resumed == [killed_at], f"the retry must go on from the checkpoint at {killed_at}: {resumed}"
    rows = jsonl_rows(client, created["id"])
    assert [r["image"] for r in rows] == [f"{i:03d}-{p.name}" for i, p in enumerate(files)]
    table = list(csv.reader(io.StringIO(client.get(created["links"]["results_csv"]).text)))
    assert [r[0] for r in table] == ["image", *(r["image"] for r in rows)]


SLOW = {"GRAFT_BATCH_PREDICT_STEP": "1", "GRAFT_PREDICT_PARALLEL": "1"}  # a step (and checkpoint) per image


def test_cli_predict_batch_watches_and_saves_the_results(trained, tmp_path):
    from typer.testing import CliRunner

    from service import cli
    from service.app import create_app
    from tests.support.live import uvicorn_thread

    settings, client, _, job = trained
    folder = tmp_path / "pics"
    folder.mkdir()
    for p in hymenoptera_files("val", "bees")[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
    worker.start()
    with uvicorn_thread(create_app(settings)) as url:
        result = CliRunner().invoke(cli.app, ["predict-batch", job["model_id"], "--zip", str(folder), "--top-k", "1",
                                              "--out", str(tmp_path / "out.jsonl")], env={"GRAFT_URL": url})
    worker.join(60)
    assert result.exit_code == 0, result.output
    assert "succeeded, 2/2 images" in result.output
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rows) == sorted(p.name for p in hymenoptera_files("val", "bees")[:2])
    refused = CliRunner().invoke(cli.app, ["predict-batch", job["model_id"]], env={"GRAFT_URL": "http://127.0.0.1:9"})
    assert refused.exit_code == 2 and "either a DATASET_ID or --zip" in refused.output


def test_migration_0008_goes_both_ways_and_claims_say_the_kind(any_db_settings, db):
    from alembic import command
    from sqlalchemy import create_engine, inspect

    from service.store.migrate import alembic_config
    from service.store.queue import JobQueue
    from service.store.tables import Dataset

    engine = create_engine(any_db_settings.database_url.replace("postgresql://", "postgresql+psycopg://"))
    cfg = alembic_config(any_db_settings.database_url)
    command.downgrade(cfg, "0007_webhooks")
    assert not {"kind", "source_model_id"} & {c["name"] for c in inspect(engine).get_columns("job")}
    command.upgrade(cfg, "heads")
    assert {"kind", "source_model_id"} <= {c["name"] for c in inspect(engine).get_columns("job")}
    engine.dispose()
    with db.session() as s:
        s.add(Dataset(id="d", name="d", classes=[], class_counts={}, split_counts={}, num_images=0,
                      has_val_split=False, rejected=[]))
        s.flush()
        JobQueue.enqueue(s, dataset_id="d", config={}, max_attempts=1)
        JobQueue.enqueue(s, dataset_id="d", config={"top_k": 1}, max_attempts=1, kind="batch_predict",
                         source_model_id="m1")
    queue = JobQueue(db, stale_after_s=5)
    claims = [queue.claim("w"), queue.claim("w")]
    assert [(c.kind, c.source_model_id) for c in claims] == [("train", None), ("batch_predict", "m1")]
