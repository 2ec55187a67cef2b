"""A test split on the way in: `test/` folders and `split: test` rows are kept, counted and checked
for leakage, never count towards what a class needs to train, and reach a job as test tensors only."""
from __future__ import annotations

import json

import pytest
import torch

from service.store.blobs import BlobStore
from service.store.db import Database
from tests.support.data import hymenoptera_files
from tests.support.ingest import (  # noqa: F401 (fixtures)
    assert_problem,
    class_folders,
    client,
    encode,
    guard,
    make_zip,
    noise,
    upload,
)
from tests.support.training import PRE, Recorder
from workers.config import TrainConfig
from workers.worker import load_training_data
from workers.preprocessing import decode_square
from workers.worker import Worker


def created(resp) -> dict:
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_zip_test_folder_is_counted_as_its_own_split(client, guard):
    entries = class_folders({"ants": 5, "bees": 5}, "train")
    entries.update(class_folders({"ants": 2, "bees": 2}, "val", seed=40))
    entries.update(class_folders({"ants": 3, "bees": 1}, "test", seed=80))
    body = created(upload(client, make_zip({f"set/{k}": v for k, v in entries.items()})))
    assert body["split_counts"] == {"test": {"ants": 3, "bees": 1}, "train": {"ants": 5, "bees": 5},
                                    "val": {"ants": 2, "bees": 2}}
    assert body["rejected"] == [] and body["trainable"] and body["num_images"] == 18
    listed = client.get(f"/v1/datasets/{body['id']}/images", params={"limit": 100}).json()
    assert sorted(img["original_name"] for img in listed if img["split"] == "test") == \
        sorted(f"set/{k}" for k in entries if k.startswith("test/"))
    guard.check_clean()


@pytest.mark.parametrize("manifest", ["labels.csv", "labels.jsonl"])
def test_manifest_rows_with_split_test(client, manifest):
    files = {f"flat/{i}.png": encode(noise(i)) for i in range(14)}
    rows = [(f"flat/{i}.png", "ants" if i % 2 else "bees", "test" if i >= 10 else "TRAIN" if i < 8 else "")
            for i in range(14)]
    if manifest == "labels.csv":
        text = "path,label,split\n" + "".join(f"{p},{label},{split}\n" for p, label, split in rows)
    else:
        text = "\n".join(json.dumps({"path": p, "label": label, "split": split or None}) for p, label, split in rows)
    body = created(upload(client, make_zip({**files, manifest: text.encode()})))
    assert body["split_counts"] == {"test": {"ants": 2, "bees": 2}, "train": {"ants": 4, "bees": 4},
                                    "unsplit": {"ants": 1, "bees": 1}}
    assert not body["has_val_split"] and body["rejected"] == []


def test_test_images_do_not_count_towards_training(client):
    entries = class_folders({"ants": 6, "bees": 3}, "train")
    entries.update(class_folders({"bees": 4, "wasps": 5}, "test", seed=60))
    body = created(upload(client, make_zip(entries)))
    assert not body["trainable"]
    problems = body["report"]["problems"]
    assert problems == [
        "class 'bees' has 3 images outside test/; at least 5 are needed to train, 20+ recommended",
        ("class 'wasps' has images only under test/; a model cannot learn it from test images (they are "
         "held out): add at least 5 to train/"),
    ]
    problem = assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "'wasps'", "test/")
    assert problem["problems"] == problems


def test_near_duplicates_across_test_and_train_are_leakage(client):
    photo, twin = noise(7, size=(96, 64)), noise(9, size=(96, 64))
    entries = class_folders({"ants": 5, "bees": 5}, "train")
    entries.update(class_folders({"ants": 1, "bees": 1}, "val", seed=30))
    entries["train/ants/photo.png"] = encode(photo)
    entries["test/ants/photo-again.jpg"] = encode(photo.resize((72, 48)), "JPEG", quality=80)
    entries["val/bees/twin.png"] = encode(twin)
    entries["test/bees/twin-again.jpg"] = encode(twin, "JPEG", quality=70)
    report = created(upload(client, make_zip(entries)))["report"]
    assert report["leakage_count"] == 2
    pairs = {frozenset(k for k in ("train", "val", "test") if pair[k]): pair for pair in report["leakage"]}
    assert set(pairs) == {frozenset({"train", "test"}), frozenset({"val", "test"})}
    train_test = pairs[frozenset({"train", "test"})]
    assert (train_test["train"]["path"], train_test["test"]["path"]) == ("train/ants/photo.png",
                                                                         "test/ants/photo-again.jpg")
    assert pairs[frozenset({"val", "test"})]["val"]["path"] == "val/bees/twin.png"
    warnings = " | ".join(report["warnings"])
    assert "2 near-duplicate pair(s) across test" in warnings and "test accuracy will look better" in warnings
    assert "across train and val" not in warnings


def test_without_a_val_split_unsplit_and_test_twins_are_leakage(client):
    photo = noise(7, size=(96, 64))
    files = {f"{i}.png": encode(noise(100 + i)) for i in range(10)}
    files["photo.png"], files["photo-again.jpg"] = encode(photo), encode(photo, "JPEG", quality=80)
    rows = [f"{i}.png,{'ants' if i < 5 else 'bees'}," for i in range(10)]
    rows += ["photo.png,ants,", "photo-again.jpg,ants,test"]
    report = created(upload(client, make_zip({**files, "labels.csv": ("path,label,split\n" + "\n".join(rows)).encode()})))["report"]
    assert report["leakage_count"] == 1 and report["near_duplicate_count"] == 0
    (pair,) = report["leakage"]
    assert (pair["train"]["path"], pair["test"]["path"], pair["val"]) == ("photo.png", "photo-again.jpg", None)


def _hymenoptera_zip(with_test: bool) -> tuple[bytes, list[bytes]]:
    entries, test_bytes = {}, []
    for label in ("ants", "bees"):
        for p in hymenoptera_files("train", label)[:6]:
            entries[f"train/{label}/{p.name}"] = p.read_bytes()
        if with_test:
            for p in hymenoptera_files("val", label)[:3]:
                entries[f"test/{label}/{p.name}"] = p.read_bytes()
                test_bytes.append(p.read_bytes())
    return make_zip(entries), test_bytes


def _prepare(settings, dataset_id: str):
    db = Database(settings.database_url)
    try:
        return load_training_data(db, BlobStore(settings.blobs_dir), dataset_id,
                            TrainConfig(strategy="linear_probe", image_size=64), PRE, Recorder())
    finally:
        db.dispose()


def test_prepare_data_keeps_test_images_out_of_train_and_val(settings, client):
    with_test, test_bytes = _hymenoptera_zip(True)
    without_test, _ = _hymenoptera_zip(False)
    held = _prepare(settings, created(upload(client, with_test))["id"])
    plain = _prepare(settings, created(upload(client, without_test))["id"])
    # Exactly the test folder's images, as the trainer will see them, with their labels...
    expected = torch.stack([decode_square(b, PRE) for b in test_bytes])
    assert held.test_x is not None and len(held.test_x) == 6 and held.test_y.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(map(bytes, held.test_x.flatten(1).numpy())) == sorted(map(bytes, expected.flatten(1).numpy()))
    # ...none of them in train or val, and the val split drawn as if they were not there.
    seen = {bytes(x) for x in torch.cat([held.train_x, held.val_x]).flatten(1).numpy()}
    assert not seen & {bytes(x) for x in held.test_x.flatten(1).numpy()}
    for a, b in ((held.train_x, plain.train_x), (held.train_y, plain.train_y),
                 (held.val_x, plain.val_x), (held.val_y, plain.val_y)):
        assert torch.equal(a, b)
    assert plain.test_x is None and plain.test_y is None


def test_a_model_reports_its_test_scores_through_the_api(settings, client):
    settings.torch_threads = 1
    entries = class_folders({"ants": 5, "bees": 5}, "train")
    entries.update(class_folders({"ants": 2, "bees": 2}, "test", seed=40))
    dataset = created(upload(client, make_zip(entries)))
    job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe",
                                        "image_size": 32, "epochs": 1})
    assert job.status_code == 202, job.text
    Worker(settings).run(max_jobs=1)
    done = client.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done
    metrics = client.get(f"/v1/models/{done['model_id']}").json()["metrics"]
    assert metrics["num_test_images"] == 4 and metrics["test"]["num_images"] == 4
    assert metrics["test"]["confusion_matrix"]["labels"] == ["ants", "bees"]
    assert sum(map(sum, metrics["test"]["confusion_matrix"]["matrix"])) == 4
    assert metrics["num_train_images"] + metrics["num_val_images"] == 10  # test images trained nothing
