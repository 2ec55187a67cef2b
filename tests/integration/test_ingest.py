"""Ways data comes in (zip layouts, manifests, adding and removing images), dataset versions,
the dataset report, content-addressed storage, and the 0002 migration on SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib
import json

import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from service.app import create_app
from service.store.db import Database, utcnow
from service.store.migrate import alembic_config
from service.store.tables import Model
from tests.support.ingest import (Guard, assert_problem, class_folders, client, encode, guard,  # noqa: F401
                                       make_zip, noise, png, upload)


def created(resp) -> dict:
    assert resp.status_code == 201, resp.text
    return resp.json()


def add(client, dataset_id: str, label: str, *files: tuple[str, bytes], split: str | None = None):
    data = {"label": label, **({"split": split} if split else {})}
    return client.post(f"/v1/datasets/{dataset_id}/images", data=data,
                       files=[("file", (name, content, "application/octet-stream")) for name, content in files])


def images(client, dataset_id: str) -> list[dict]:
    return client.get(f"/v1/datasets/{dataset_id}/images", params={"limit": 1000}).json()


# -- ways in -------------------------------------------------------------------------------------

def test_folder_layouts_with_a_wrapping_folder_and_a_test_split(client, guard):
    entries = {f"My Photos/{k}": v for k, v in class_folders({"ants": 5, "bees": 5}, "train").items()}
    entries.update({f"My Photos/{k}": v for k, v in class_folders({"ants": 1, "bees": 2}, "val", seed=50).items()})
    entries["My Photos/test/ants/t.png"] = png(70)
    entries["My Photos/README.txt"] = b"hi"
    body = created(upload(client, make_zip(entries)))
    assert body["split_counts"] == {"test": {"ants": 1}, "train": {"ants": 5, "bees": 5}, "val": {"ants": 1, "bees": 2}}
    assert body["has_val_split"] and body["trainable"] and body["version"] == 1 and not body["frozen"]
    why = {r["path"]: r["reason"] for r in body["rejected"]}
    assert "My Photos/test/ants/t.png" not in why and "My Photos/README.txt" in why
    guard.check_clean()


def test_csv_manifest_labels_a_flat_folder(client, guard):
    files = {f"pics/flat/{i}.png": png(i) for i in range(14)}
    rows = ["Path , Label , Split"]  # header case and spaces do not matter
    rows += [f"flat/{i}.png,{'ants' if i < 6 else 'bees'},{'val' if i in (0, 6) else 'train'}" for i in range(12)]
    rows += ["./flat/12.png,bees,holdout", "flat/0.png,bees,", "flat/missing.png,ants,", "flat/13.png,  , "]
    csv_text = "\ufeff" + "\r\n".join(rows) + "\r\n"  # Excel writes a BOM and CRLF
    body = created(upload(client, make_zip({**files, "pics/labels.csv": csv_text.encode()})))
    assert body["split_counts"] == {"train": {"ants": 5, "bees": 5}, "val": {"ants": 1, "bees": 1}}
    why = {r["path"]: r["reason"] for r in body["rejected"]}
    assert "not train, val or test" in why["pics/flat/12.png"] and "listed again" in why["flat/0.png"]
    assert "no usable file" in why["flat/missing.png"] and "pics/flat/13.png" not in why
    assert body["report"]["unlabeled_count"] == 1  # an empty label: an unlabeled image (issue 16)
    guard.check_clean()


def test_jsonl_manifest_and_broken_manifests(client, guard):
    files = {f"{i}.png": png(i) for i in range(10)}
    lines = [json.dumps({"path": f"{i}.png", "label": "ants" if i < 5 else "bees"}) for i in range(10)]
    body = created(upload(client, make_zip({**files, "labels.jsonl": "\n".join(lines).encode()})))
    assert body["class_counts"] == {"ants": 5, "bees": 5} and body["rejected"] == []
    for manifest, words in ((b"[" * 100_000, "not valid json"), (b'["a.png", "ants"]', "object"),
                            (b'{"path": "0.png", "label": 3}', "strings"), ("caf\u00e9".encode("latin-1"), "utf-8")):
        assert_problem(upload(client, make_zip({**files, "labels.jsonl": manifest})), 422, words)
    assert_problem(upload(client, make_zip({**files, "labels.csv": b"file,class\n0.png,ants\n"})), 422, "header")
    assert_problem(upload(client, make_zip({**files, "labels.csv": b"path,label\n0.png,\"" + b"x" * 200_000})), 422, "malformed")
    assert_problem(upload(client, make_zip({**files, "labels.csv": b"path,label\n", "labels.jsonl": b""})),
                   422, "one manifest")
    guard.check_clean()


def test_an_upload_with_no_usable_image_is_422_listing_every_file(client, guard):
    problem = assert_problem(upload(client, make_zip({"ants/a.txt": b"x", "bees/b.png": b""})), 422, "no usable images")
    assert {r["path"] for r in problem["rejected"]} == {"ants/a.txt", "bees/b.png"}
    guard.check_unchanged()


# -- adding and removing, versions ---------------------------------------------------------------

def test_adding_and_removing_images_changes_an_unused_dataset_in_place(client, guard):
    body = created(upload(client, make_zip(class_folders({"ants": 5, "bees": 4}))))
    ds = body["id"]
    assert not body["trainable"]
    existing = next(i for i in images(client, ds) if i["label"] == "ants")
    ants_png = class_folders({"ants": 1})["ants/img0.png"]
    resp = add(client, ds, " bees ", ("new.png", png(200)), ("notes.txt", b"hello"), ("again.png", png(200)),
               ("dup.png", ants_png))
    assert resp.status_code == 200, resp.text
    after = resp.json()
    assert after["id"] == ds and after["version"] == 1 and after["trainable"]
    assert after["class_counts"] == {"ants": 5, "bees": 5}
    why = {r["path"]: r["reason"] for r in after["rejected"]}
    assert "not a supported image" in why["notes.txt"] and "exact duplicate" in why["again.png"]
    assert "already in the dataset labeled 'ants'" in why["dup.png"]
    gone = client.delete(f"/v1/datasets/{ds}/images/{existing['id']}")
    assert gone.status_code == 200 and gone.json()["class_counts"] == {"ants": 4, "bees": 5}
    assert not gone.json()["trainable"] and existing["id"] not in {i["id"] for i in images(client, ds)}
    assert_problem(client.delete(f"/v1/datasets/{ds}/images/{existing['id']}"), 404, "no image")
    assert_problem(add(client, ds, "bees", ("x.txt", b"x")), 422, "nothing was added")
    assert_problem(add(client, "nope", "bees", ("x.png", png(201))), 404)
    assert_problem(client.post(f"/v1/datasets/{ds}/images", json={"label": "x"}), 415)
    guard.check_clean()


@pytest.fixture
def db_client(any_db_settings):
    """A client on SQLite and on PostgreSQL (row locks, INSERT ... SELECT and the version lookups)."""
    with TestClient(create_app(any_db_settings)) as c:
        yield c


def test_a_dataset_a_job_used_is_frozen_and_changes_make_a_new_version(db_client, any_db_settings):
    client, settings = db_client, any_db_settings
    guard = Guard(settings)
    v1 = created(upload(client, make_zip(class_folders({"ants": 5, "bees": 5}))))
    v1_images = images(client, v1["id"])
    job1 = client.post("/v1/jobs", json={"dataset_id": v1["id"]}).json()
    assert job1["dataset_version"] == 1 and client.get(f"/v1/datasets/{v1['id']}").json()["frozen"]

    resp = add(client, v1["id"], "wasps", *[(f"w{i}.png", png(300 + i)) for i in range(5)], split=None)
    v2 = resp.json()
    assert resp.status_code == 200 and v2["id"] != v1["id"] and v2["version"] == 2
    assert v2["previous_version_id"] == v1["id"] and not v2["frozen"]
    assert v2["class_counts"] == {"ants": 5, "bees": 5, "wasps": 5}
    old = client.get(f"/v1/datasets/{v1['id']}").json()
    assert old["next_version_id"] == v2["id"] and old["class_counts"] == {"ants": 5, "bees": 5}
    assert images(client, v1["id"]) == v1_images  # what job 1 trains on did not move

    conflict = assert_problem(add(client, v1["id"], "ants", ("late.png", png(310))), 409, "newer version")
    assert conflict["latest_version_id"] == v2["id"]
    assert_problem(client.delete(f"/v1/datasets/{v1['id']}/images/{v1_images[0]['id']}"), 409)

    v2_again = add(client, v2["id"], "wasps", ("w9.png", png(320))).json()  # unfrozen: in place
    assert v2_again["id"] == v2["id"] and v2_again["version"] == 2
    job2 = client.post("/v1/jobs", json={"dataset_id": v2["id"]}).json()
    assert job2["dataset_version"] == 2
    v3 = client.delete(f"/v1/datasets/{v2['id']}/images/{v1_images[0]['id']}").json()
    assert v3["version"] == 3 and v3["num_images"] == 15 and v3["previous_version_id"] == v2["id"]
    # Retraining an old version exactly is allowed.
    assert client.post("/v1/jobs", json={"dataset_id": v1["id"]}).json()["dataset_version"] == 1

    # A model records the version its job trained on.
    db = Database(settings.database_url)
    with db.session() as s:
        s.add(Model(id="m" * 32, job_id=job1["id"], dataset_id=v1["id"], backbone="efficientnet_lite0",
                    classes=["ants", "bees"], metrics={}, recipe={}, artifact_dir="models/x", sha256="0" * 64,
                    size_bytes=1, created_at=utcnow()))
    db.dispose()
    model = client.get(f"/v1/models/{'m' * 32}")
    assert model.status_code == 200 and model.json()["dataset_version"] == 1
    # The same bytes are stored once, however many versions use them.
    blobs = [p for p in settings.blobs_dir.rglob("*") if p.is_file()]
    assert len(blobs) == 10 + 6
    guard.check_clean()


def test_image_and_class_limits_on_additions(client, guard, settings):
    ds = created(upload(client, make_zip(class_folders({"ants": 5, "bees": 5}))))["id"]
    settings.max_images_per_dataset = 11
    assert_problem(add(client, ds, "ants", ("a.png", png(400)), ("b.png", png(401))), 413, "at most 11")
    settings.max_images_per_dataset, settings.max_classes = 100, 2
    assert_problem(add(client, ds, "wasps", ("a.png", png(402))), 422, "at most 2")
    assert_problem(upload(client, make_zip(class_folders({"a": 1, "b": 1, "c": 1}))), 422, "at most 2")
    settings.max_classes, settings.max_images_per_dataset = 10, 7
    assert_problem(upload(client, make_zip(class_folders({"ants": 5, "bees": 5}))), 413, "at most 7")
    guard.check_clean()
    assert len(images(client, ds)) == 10


# -- the report ----------------------------------------------------------------------------------

def test_report_flags_leakage_near_duplicates_imbalance_and_stats(client, guard):
    entries = class_folders({"ants": 12, "bees": 5}, "train")
    entries.update(class_folders({"ants": 2, "bees": 2}, "val", seed=100))
    photo = noise(7, size=(96, 64))
    entries["train/ants/photo.png"] = encode(photo, "PNG")
    entries["val/ants/photo-again.jpg"] = encode(photo.resize((72, 48)), "JPEG", quality=80)  # leakage
    entries["train/bees/twin.jpg"] = encode(noise(8, size=(96, 64)), "JPEG", quality=90)
    entries["train/bees/twin2.jpg"] = encode(noise(8, size=(96, 64)), "JPEG", quality=60)  # near-duplicate
    body = created(upload(client, make_zip(entries)))
    report = client.get(f"/v1/datasets/{body['id']}/report").json()
    assert report == body["report"] and report["version"] == 1 and report["dataset_id"] == body["id"]
    assert report["leakage_count"] == 1
    pair = report["leakage"][0]
    assert (pair["train"]["path"], pair["val"]["path"]) == ("train/ants/photo.png", "val/ants/photo-again.jpg")
    assert pair["distance"] <= 4 and pair["train"]["id"] == hashlib.sha256(entries["train/ants/photo.png"]).hexdigest()
    assert report["near_duplicate_count"] == 1
    assert {report["near_duplicates"][0]["a"]["path"], report["near_duplicates"][0]["b"]["path"]} == \
        {"train/bees/twin.jpg", "train/bees/twin2.jpg"}
    assert report["imbalance_ratio"] == pytest.approx(16 / 9, abs=1e-3)
    assert report["image_stats"]["formats"] == {"PNG": 22, "JPEG": 3}
    assert report["image_stats"]["width"] == {"min": 24, "median": 24.0, "max": 96}
    warnings = " | ".join(report["warnings"])
    assert "near-duplicate pair(s) across train and val" in warnings and "20+ are recommended" in warnings
    assert report["trainable"] and report["problems"] == []


def test_report_explains_why_a_dataset_cannot_train(client, guard):
    entries = class_folders({"ants": 6, "bees": 1}, "train")
    entries.update(class_folders({"wasps": 5}, "val", seed=70))
    body = created(upload(client, make_zip(entries)))
    problems = body["report"]["problems"]
    assert problems == ["class 'bees' has 1 image; at least 5 are needed to train, 20+ recommended",
                        "class 'wasps' has no training images (all are under val/); move some to train/"]
    warnings = " | ".join(body["report"]["warnings"])
    assert "class 'ants' has no validation images" in warnings and "imbalanced" in warnings
    problem = assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "'bees'", "'wasps'")
    assert problem["problems"] == problems


def test_unknown_dataset_ids_are_404_everywhere(client):
    for path in ("/v1/datasets/nope", "/v1/datasets/nope/report", "/v1/datasets/nope/images",
                 "/v1/datasets/%00/report"):
        assert_problem(client.get(path), 404)
    assert_problem(client.post("/v1/jobs", json={"dataset_id": "\x00"}), 404)
    assert_problem(client.delete(f"/v1/datasets/nope/images/{'0' * 64}"), 404)


# -- the migration -------------------------------------------------------------------------------

def test_migration_0002_keeps_existing_data_both_ways(any_db_settings):
    url = any_db_settings.database_url
    cfg = alembic_config(url)
    command.downgrade(cfg, "0001")
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        for ds in ("d1", "d2"):
            conn.execute(text("INSERT INTO dataset VALUES (:id, 'old', :now, '[\"a\",\"b\"]', '{}', '{}', 1, false, '[]')"),
                         {"id": ds, "now": utcnow().replace(tzinfo=None)})
        conn.execute(text("INSERT INTO dataset_image (dataset_id, sha256, label, split, original_name, width, height) "
                          "VALUES ('d1', :sha, 'a', NULL, 'a/x.png', 4, 4)"), {"sha": "ab" * 32})
        conn.execute(text("INSERT INTO job (id, dataset_id, config, status, priority, created_at, run_after, attempts, "
                          "max_attempts, cancel_requested, progress) VALUES ('j1', 'd1', '{}', 'queued', 0, :now, :now, "
                          "0, 3, false, '{}')"), {"now": utcnow().replace(tzinfo=None)})
    command.upgrade(cfg, "heads")
    with engine.begin() as conn:
        rows = conn.execute(text("SELECT id, version, frozen, trainable FROM dataset ORDER BY id")).all()
        assert [(r[0], r[1], bool(r[2]), bool(r[3])) for r in rows] == [("d1", 1, True, True), ("d2", 1, False, True)]
        assert conn.execute(text("SELECT count(*) FROM dataset_image")).scalar_one() == 1
    with TestClient(create_app(any_db_settings)) as client:  # datasets from before reports still answer
        report = client.get("/v1/datasets/d1/report").json()
        assert report["trainable"] and report["num_images"] == 1 and report["version"] == 1
        assert client.get("/v1/datasets/d2").json()["report"]["num_images"] == 0
    command.downgrade(cfg, "0002_datasets-1")
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM dataset_image")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM dataset")).scalar_one() == 2
    command.upgrade(cfg, "heads")
    engine.dispose()
