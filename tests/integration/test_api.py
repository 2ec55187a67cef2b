"""The HTTP contract in-process: uploads, jobs, models and every error path as problem+json."""
from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.support.data import hymenoptera_files, make_zip, subset_zip

PROBLEM = "application/problem+json"


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def assert_problem(resp, status: int, *words: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["detail"]
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body


def upload(client, data: bytes, name: str | None = None):
    form = {"name": name} if name else {}
    return client.post("/v1/datasets", files={"file": ("set.zip", data, "application/zip")}, data=form)


def png_bytes(color=(255, 0, 0), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (40, 30), color).save(buf, "PNG")
    return buf.getvalue()


def test_health_and_backbones(client):
    assert client.get("/healthz").json()["status"] == "ok"
    backbones = {b["name"]: b for b in client.get("/v1/backbones").json()}
    lite0 = backbones["efficientnet_lite0"]
    assert lite0["weights_available"] and lite0["input_size"] == 224 and lite0["feature_dim"] == 1280
    assert {"resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"} <= set(backbones)


def test_upload_split_layout_keeps_split_and_lists_skipped_files(client):
    ants = hymenoptera_files("train", "ants")
    jpeg = ants[0].read_bytes()
    data = make_zip({
        "pics/train/ants/a1.jpg": jpeg, "pics/train/ants/a2.jpg": ants[1].read_bytes(),
        "pics/train/bees/b1.png": png_bytes(), "pics/val/ants/a3.jpg": ants[2].read_bytes(),
        "pics/val/bees/b2.png": png_bytes((0, 0, 255), "RGBA"),
        "pics/train/ants/a1-copy.jpg": jpeg,  # exact duplicate within the class
        "pics/train/ants/truncated.jpg": jpeg[: len(jpeg) // 2],
        "pics/train/bees/notes.txt": b"not an image",
        "pics/train/bees/empty.png": b"",
        "__MACOSX/pics/train/ants/._a1.jpg": b"\x00\x05\x16\x07",
        "pics/.DS_Store": b"\x00\x00\x00\x01Bud1",
    })
    resp = upload(client, data, name="insects")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["name"] == "insects" and body["classes"] == ["ants", "bees"]
    assert body["class_counts"] == {"ants": 3, "bees": 2} and body["num_images"] == 5
    assert body["has_val_split"] and body["split_counts"]["val"] == {"ants": 1, "bees": 1}
    reasons = {r["path"]: r["reason"] for r in body["rejected"]}
    assert "duplicate" in reasons["pics/train/ants/a1-copy.jpg"]
    assert "truncated" in reasons["pics/train/ants/truncated.jpg"]
    assert "not a supported image" in reasons["pics/train/bees/notes.txt"]
    assert "empty" in reasons["pics/train/bees/empty.png"]
    assert "__MACOSX/pics/train/ants/._a1.jpg" in reasons and "pics/.DS_Store" in reasons
    assert client.get(f"/v1/datasets/{body['id']}").json() == body
    assert body["id"] in [d["id"] for d in client.get("/v1/datasets").json()]


def test_upload_label_layout_and_hymenoptera_quirks(client):
    ants, bees = hymenoptera_files("train", "ants"), hymenoptera_files("train", "bees")
    quirky = [p for p in ants if p.name in ("formica.jpeg", "ant photos.jpg", "imageNotFound.gif")]
    assert len(quirky) == 3
    entries = {f"ants/{p.name}": p.read_bytes() for p in ants[:3] + quirky}
    entries.update({f"bees/{p.name}": p.read_bytes() for p in bees[:3]})
    body = upload(client, make_zip(entries)).json()
    assert not body["has_val_split"] and body["class_counts"] == {"ants": 6, "bees": 3}
    assert body["rejected"] == []


@pytest.mark.parametrize("payload, words", [
    (b"this is not a zip at all", ("not a zip",)),
    (b"PK\x03\x04" + b"\x00" * 50, ("broken",)),
])
def test_upload_not_a_zip_or_broken_zip_is_422(client, payload, words):
    assert_problem(upload(client, payload), 422, *words)


def test_upload_with_wrong_media_type_is_415(client):
    assert_problem(client.post("/v1/datasets", json={"file": "x"}), 415, "multipart")


def test_one_class_is_reported_untrainable_and_a_job_on_it_is_422(client):
    data = make_zip({f"ants/{p.name}": p.read_bytes() for p in hymenoptera_files("train", "ants")[:4]})
    body = upload(client, data).json()
    assert not body["trainable"] and "at least 2 classes" in body["report"]["problems"][0]
    assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "at least 2 classes")


def test_class_too_small_to_train_is_422_naming_it(client):
    ants, bees = hymenoptera_files("train", "ants"), hymenoptera_files("train", "bees")
    data = make_zip({"ants/a.jpg": ants[0].read_bytes(), **{f"bees/{p.name}": p.read_bytes() for p in bees[:5]}})
    body = upload(client, data).json()
    assert_problem(client.post("/v1/jobs", json={"dataset_id": body["id"]}), 422, "'ants'")


@pytest.mark.parametrize("bad_name", ["../evil/x.jpg", "/etc/x.jpg", "C:/x.jpg"])
def test_path_traversal_rejects_the_whole_archive(client, settings, bad_name):
    data = make_zip({"ants/a.jpg": png_bytes(), "bees/b.jpg": png_bytes(), bad_name: png_bytes()})
    assert_problem(upload(client, data), 422, "outside the archive")
    assert not (settings.data_dir.parent / "evil").exists()


def test_body_over_the_cap_is_413_with_and_without_content_length(settings):
    settings.max_upload_bytes = 10_000
    with TestClient(create_app(settings)) as client:
        big = b"x" * 20_000
        assert_problem(upload(client, big), 413, "limit")

        def chunks():
            for _ in range(20):
                yield b"y" * 1000
        resp = client.post("/v1/datasets", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=zzz"})
        assert_problem(resp, 413, "limit")
        assert client.get("/healthz").status_code == 200


@pytest.fixture
def dataset_id(client) -> str:
    resp = upload(client, subset_zip(3, 2))
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def test_job_is_queued_with_defaults_filled_in(client, dataset_id):
    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id})
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert job["status"] == "queued" and job["model_id"] is None
    cfg = job["config"]
    assert cfg["strategy"] == "auto"  # auto chooses the backbone (and so the image size), epochs, rate...
    assert cfg["backbone"] is None and cfg["image_size"] is None and cfg["epochs"] is None
    assert cfg["learning_rate"] is None
    explicit = client.post("/v1/jobs", json={"dataset_id": dataset_id, "strategy": "fine_tune"}).json()["config"]
    assert explicit["backbone"] == "efficientnet_lite0" and explicit["image_size"] == 224
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    queued = [j["id"] for j in client.get("/v1/jobs", params={"status": "queued"}).json()]
    assert job["id"] in queued and len(queued) == 2


@pytest.mark.parametrize("extra, where", [
    ({"epochs": 0}, "epochs"), ({"learning_rate": -1}, "learning_rate"), ({"strategy": "magic"}, "strategy"),
    ({"augmentation": "extreme"}, "augmentation"), ({"val_fraction": 0.9}, "val_fraction"),
    ({"colour": "blue"}, "colour"), ({"backbone": "vgg99"}, "efficientnet_lite0"),
])
def test_bad_job_fields_are_422(client, dataset_id, extra, where):
    assert_problem(client.post("/v1/jobs", json={"dataset_id": dataset_id, **extra}), 422, where)


def test_job_on_unknown_dataset_is_404(client):
    assert_problem(client.post("/v1/jobs", json={"dataset_id": "nope"}), 404, "dataset")


def test_cancel_queued_job_then_cancel_again_is_409(client, dataset_id):
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id}).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "cancelled")


def test_predict_with_a_model_that_is_not_ready_is_409(client, dataset_id):
    job = client.post("/v1/jobs", json={"dataset_id": dataset_id}).json()
    resp = client.post(f"/v1/models/{job['id']}/predict", files={"file": ("a.png", png_bytes(), "image/png")})
    assert_problem(resp, 409, "not ready")


@pytest.mark.parametrize("path", ["/v1/datasets/nope", "/v1/jobs/nope", "/v1/models/nope", "/v1/nothing"])
def test_unknown_ids_and_routes_are_404(client, path):
    assert_problem(client.get(path), 404)


def test_unknown_model_predict_and_cancel_are_404(client):
    assert_problem(client.post("/v1/models/nope/predict", files={"file": ("a.png", png_bytes(), "image/png")}), 404)
    assert_problem(client.post("/v1/jobs/nope/cancel"), 404)
