"""Seeing why (issue 19), through the API on one linear probe a real worker trained (64 px): its
held-out predictions per image are what /predict answers, its plots are PNGs, the thumbnails are
JPEGs, explanations come back as overlays, and a job trains on from it with a class added."""
from __future__ import annotations

import base64
import hashlib
import io
import threading
from pathlib import Path

import pytest
from PIL import Image

from service.api.auth import create_key, create_project
from service.store.db import Database
from tests.support.data import hymenoptera_files, subset_zip
from tests.support.training import api_with_trained_probe
from workers.worker import Worker

SAMPLES = Path(__file__).resolve().parents[2] / "service" / "samples" / "bloodcells"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    with api_with_trained_probe(tmp_path_factory.mktemp("insights") / "data") as (settings, client, dataset, job):
        model = client.get(f"/v1/models/{job['model_id']}").json()
        yield settings, client, dataset, model


def val_files() -> dict[str, bytes]:
    """sha256 -> bytes of the val photos api_with_trained_probe uploaded."""
    files = [p.read_bytes() for label in ("ants", "bees") for p in hymenoptera_files("val", label)[:5]]
    return {hashlib.sha256(b).hexdigest(): b for b in files}


def problem(resp, status: int, *words: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    for word in words:
        assert word in resp.json()["detail"], resp.json()["detail"]


def test_the_held_out_rows_are_what_predict_answers(trained):
    settings, client, dataset, model = trained
    assert model["metrics"]["held_out"] == {"predictions": "val", "images": 10, "test_images": 0}
    answer = client.get(model["evaluation"], params={"limit": 1000}).json()
    rows = answer["rows"]
    assert answer["total"] == len(rows) == 10 and answer["predictions"] == "val"
    assert [r["loss"] for r in rows] == sorted((r["loss"] for r in rows), reverse=True)  # top losses first
    files = val_files()
    assert {r["image_id"] for r in rows} == set(files)
    ids = [r["image_id"] for r in rows]
    predicted = client.post(f"/v1/models/{model['id']}/predict", params={"top_k": 2},
                            files=[("file", (f"{i}.jpg", files[i], "image/jpeg")) for i in ids]).json()["results"]
    for row, result in zip(rows, predicted):
        scores = {p["label"]: p["score"] for p in result["predictions"]}
        assert row["predicted_label"] == result["predictions"][0]["label"]
        assert row["probability"] == pytest.approx(scores[row["predicted_label"]], abs=2e-3)
        assert row["true_probability"] == pytest.approx(scores[row["true_label"]], abs=2e-3)
        assert row["correct"] == (row["true_label"] == row["predicted_label"]) and row["split"] == "val"


def test_one_confusion_matrix_cell_is_its_images(trained):
    settings, client, dataset, model = trained
    cm = model["metrics"]["confusion_matrix"]
    for i, true in enumerate(cm["labels"]):
        for j, predicted in enumerate(cm["labels"]):
            cell = client.get(model["evaluation"], params={"true": true, "predicted": predicted}).json()
            assert cell["total"] == cm["matrix"][i][j]
            assert all(r["true_label"] == true and r["predicted_label"] == predicted for r in cell["rows"])
    wrong = client.get(model["evaluation"], params={"correct": False, "sort": "probability", "order": "asc"}).json()
    assert wrong["total"] == sum(cm["matrix"][i][j] for i in range(2) for j in range(2) if i != j)
    problem(client.get(model["evaluation"], params={"true": "wasps"}), 422, "not a class", "ants, bees")


def test_every_plot_is_a_png_of_a_sensible_size(trained):
    settings, client, dataset, model = trained
    assert set(model["plots"]) == {"training_curves", "confusion_matrix", "reliability", "precision_recall"}
    for name, url in model["plots"].items():
        resp = client.get(url)
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png", (name, resp.text)
        image = Image.open(io.BytesIO(resp.content))
        assert image.format == "PNG" and 400 <= image.width <= 2000 and 300 <= image.height <= 2000, (name, image.size)
        assert client.get(url).content == resp.content  # drawn once, then read back
    assert (settings.models_dir / model["id"] / "plots" / "reliability.png").is_file()
    problem(client.get(f"/v1/models/{model['id']}/plots/roc"), 404, "training_curves")


def test_thumbnails_are_small_jpegs(trained):
    settings, client, dataset, model = trained
    image_id = next(iter(val_files()))
    resp = client.get(f"/v1/datasets/{dataset['id']}/images/{image_id}/thumbnail", params={"size": 96})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(resp.content))
    assert thumb.format == "JPEG" and max(thumb.size) == 96
    problem(client.get(f"/v1/datasets/{dataset['id']}/images/{'0' * 64}/thumbnail"), 404, "no image")


def test_explain_answers_an_overlay_and_the_raw_map(trained):
    settings, client, dataset, model = trained
    photo = hymenoptera_files("val", "bees")[0].read_bytes()
    top = client.post(f"/v1/models/{model['id']}/predict", files={"file": ("bee.jpg", photo, "image/jpeg")}).json()
    resp = client.post(f"/v1/models/{model['id']}/explain", params={"raw": "true", "method": "gradcampp"},
                       files={"file": ("bee.jpg", photo, "image/jpeg")})
    assert resp.status_code == 200, resp.text
    [result] = resp.json()["results"]
    assert result["label"] == top["results"][0]["predictions"][0]["label"]
    assert result["score"] == pytest.approx(top["results"][0]["predictions"][0]["score"], abs=2e-3)
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay"]["data"])))
    assert overlay.format == "PNG" and overlay.size == (224, 224)  # a 64 px model's view, drawn at 224
    assert result["heatmap"]["shape"] == [2, 2] and min(min(r) for r in result["heatmap"]["values"]) >= 0
    other = client.post(f"/v1/models/{model['id']}/explain", data={"label": "ants"},
                        files={"file": ("bee.jpg", photo, "image/jpeg")}).json()["results"][0]
    assert other["label"] == "ants" and other["heatmap"] is None
    problem(client.post(f"/v1/models/{model['id']}/explain", data={"label": "wasps"},
                        files={"file": ("bee.jpg", photo, "image/jpeg")}), 422, "not a class")
    problem(client.post(f"/v1/models/{model['id']}/explain", files={"file": ("x.jpg", b"not an image", "image/jpeg")}),
            422, "x.jpg")


def test_a_model_whose_dataset_lost_an_image_still_lists_it(trained):
    settings, client, dataset, model = trained
    gone = next(iter(val_files()))
    newer = client.delete(f"/v1/datasets/{dataset['id']}/images/{gone}").json()
    assert newer["version"] == 2 and newer["id"] != dataset["id"]  # the trained-on version is frozen
    rows = client.get(model["evaluation"], params={"limit": 1000}).json()["rows"]
    assert gone in {r["image_id"] for r in rows}
    assert client.get(f"/v1/datasets/{dataset['id']}/images/{gone}/thumbnail").status_code == 200
    problem(client.get(f"/v1/datasets/{newer['id']}/images/{gone}/thumbnail"), 404, "no image")


def test_a_base_model_of_another_backbone_or_project_is_refused(trained):
    settings, client, dataset, model = trained
    problem(client.post("/v1/jobs", json={"dataset_id": dataset["id"], "base_model_id": model["id"],
                                          "backbone": "resnet18"}), 422, "efficientnet_lite0", "resnet18")
    problem(client.post("/v1/jobs", json={"dataset_id": dataset["id"], "base_model_id": "f" * 32}), 404, "no model")
    db = Database(settings.database_url)
    with db.session() as s:
        _, key = create_key(s, create_project(s, "other-team").id, "k", "admin")
    db.dispose()
    theirs = {"Authorization": f"Bearer {key}"}
    their_data = client.post("/v1/datasets", files={"file": ("b.zip", subset_zip(5, 2))}, headers=theirs).json()
    problem(client.post("/v1/jobs", json={"dataset_id": their_data["id"], "base_model_id": model["id"]},
                        headers=theirs), 404, "no model")


def test_a_job_trains_on_from_a_model_with_a_class_added(trained):
    settings, client, dataset, model = trained
    latest = client.get(f"/v1/datasets/{dataset['id']}").json()
    while latest["next_version_id"]:
        latest = client.get(f"/v1/datasets/{latest['next_version_id']}").json()
    platelets = sorted((SAMPLES / "train" / "platelet").iterdir())[:6] + sorted((SAMPLES / "val" / "platelet").iterdir())[:2]
    for split, files in (("train", platelets[:6]), ("val", platelets[6:])):
        latest = client.post(f"/v1/datasets/{latest['id']}/images", data={"label": "platelet", "split": split},
                             files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in files]).json()
    job = client.post("/v1/jobs", json={"dataset_id": latest["id"], "base_model_id": model["job_id"],
                                        "strategy": "linear_probe", "epochs": 3})
    assert job.status_code == 202, job.text
    job = job.json()
    assert job["config"]["base_model_id"] == model["id"] and job["config"]["image_size"] == 64  # the base's
    worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
    worker.start()
    worker.join(240)
    job = client.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    new = client.get(f"/v1/models/{job['model_id']}").json()
    base = new["metrics"]["base_model"]
    assert base["id"] == model["id"] and base["classes_added"] == ["platelet"] and base["classes_removed"] == []
    assert base["head"] == {"rows_kept": 2, "rows_initialized": 1}
    compared = base["compared_on"]
    val = latest["split_counts"]["val"]  # 5 + 5 hymenoptera (one less if an earlier test removed it) + 2
    assert compared["images"] == new["metrics"]["held_out"]["images"] == sum(val.values())
    known = val["ants"] + val["bees"]
    assert compared["of_classes_the_base_knows"]["images"] == known
    # The base never trained on its val images, nor on the new ones: all are unseen by it, and it
    # cannot name a platelet, so it is right on at most the ones it knows.
    assert compared["unseen_by_base"]["images"] == compared["images"]
    assert compared["base_accuracy"] <= known / compared["images"] + 1e-9
