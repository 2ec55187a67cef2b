"""End to end on a tiny dataset: a model records the dataset version it trained on, predict
applies the same image checks and conversions as uploads, and a tampered model file is refused."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.support.ingest import assert_problem, class_folders, encode, make_zip, noise, png, upload
from workers.artifacts import WEIGHTS_FILE
from workers.worker import Worker

TINY_JOB = {"strategy": "linear_probe", "image_size": 32, "epochs": 1}


@pytest.fixture
def trained(settings):
    settings.torch_threads = 1
    with TestClient(create_app(settings)) as client:
        v1 = upload(client, make_zip(class_folders({"ants": 5, "bees": 5}))).json()
        job = client.post("/v1/jobs", json={"dataset_id": v1["id"], **TINY_JOB})
        assert job.status_code == 202, job.text
        # A change after the job was queued goes to version 2; the job still trains version 1.
        v2 = client.post(f"/v1/datasets/{v1['id']}/images", data={"label": "ants"},
                         files={"file": ("late.png", png(500), "image/png")}).json()
        assert v2["version"] == 2
        Worker(settings).run(max_jobs=1)
        done = client.get(f"/v1/jobs/{job.json()['id']}").json()
        assert done["status"] == "succeeded", done
        yield client, v1, done["model_id"]


def test_model_records_the_version_and_predict_checks_images_like_uploads(trained, settings):
    client, v1, model_id = trained
    model = client.get(f"/v1/models/{model_id}").json()
    assert model["dataset_id"] == v1["id"] and model["dataset_version"] == 1
    odd = {"cmyk.jpg": encode(noise(1, mode="CMYK"), "JPEG"), "alpha.png": encode(noise(2, mode="RGBA"), "PNG"),
           "rotated.jpg": encode(noise(3, size=(40, 20)), "JPEG", exif=_rotated())}
    resp = client.post(f"/v1/models/{model_id}/predict", files=[("file", (n, d, "image/jpeg")) for n, d in odd.items()])
    assert resp.status_code == 200, resp.text
    assert [r["filename"] for r in resp.json()["results"]] == list(odd)
    for bad, words in ((b"", "empty"), (encode(noise(4), "JPEG")[:60], "corrupt"), (b"%!PS-Adobe-3.0 EPSF", "not a supported")):
        assert_problem(client.post(f"/v1/models/{model_id}/predict", files={"file": ("x.jpg", bad, "image/jpeg")}),
                       422, words)


def test_a_tampered_model_file_is_refused(trained, settings):
    client, _, model_id = trained
    with client.app.state.db.engine.connect() as conn:
        relative = conn.exec_driver_sql(f"SELECT artifact_dir FROM model WHERE id = '{model_id}'").scalar_one()
    model_dir = settings.data_dir / relative
    weights = model_dir / WEIGHTS_FILE  # beside it: the held-out predictions, checked when read
    raw = weights.read_bytes()  # the last 8 bytes inverted (zeros could equal what was there)
    weights.write_bytes(raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]))
    with TestClient(create_app(settings)) as fresh:  # a new process: nothing cached
        assert_problem(fresh.post(f"/v1/models/{model_id}/predict", files={"file": ("a.png", png(5), "image/png")}),
                       409, "sha256")


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 8
    return exif
