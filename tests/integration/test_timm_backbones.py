"""A backbone the operator brings, through every path a built-in one takes: registered as a file
(and a timm model in the Hugging Face cache), listed by GET /v1/backbones, trained by a worker as
a linear probe (shared backbone) and fine_tune_top (cached activations), served by /predict, and
exported to ONNX answering as /predict does. Missing or tampered weights fail the job at once.

The weights are timm's tiny test architectures with random values the test writes (a few hundred
kB); nothing is downloaded (a socket guard would fail the test)."""
from __future__ import annotations

import io
import json
import threading
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.integration.test_export import batch_of
from tests.support.data import hymenoptera_files, subset_zip
from tests.support.timm_weights import (TINY_EFFICIENTNET, TINY_VIT, hf_home, no_network, random_weights,  # noqa: F401
                                        write_hf_cache, write_safetensors)
from tests.support.training import one_thread  # noqa: F401
from workers.backbone_registry import remove_entry, use_registry
from workers.backbones import Preprocessing, builtin_backbones
from workers.timm_backbones import register
from workers.worker import Worker

pytestmark = pytest.mark.usefixtures("one_thread")
PHOTOS = hymenoptera_files("val", "ants")[6:8] + hymenoptera_files("val", "bees")[6:8]


@pytest.fixture
def api(settings, hf_home, no_network, tmp_path):
    """The API on a data dir whose registry holds `tiny-eff` (timm's test EfficientNet), with
    timm/test_vit's weights in the Hugging Face cache; yields (client, dataset id, weights file)."""
    weights = write_safetensors(tmp_path / "operator" / "tiny-eff.safetensors", random_weights(TINY_EFFICIENTNET, 11))
    register(settings.backbone_registry_file, "tiny-eff", weights, TINY_EFFICIENTNET,
             {s.name for s in builtin_backbones()})
    write_hf_cache(hf_home, f"timm/{TINY_VIT}", random_weights(TINY_VIT, 12))
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(8, 4))}).json()
        yield client, dataset["id"], weights
    use_registry(None)


def train(client, settings, dataset_id: str, **job) -> dict:
    """Submit a job and run one worker (in this process) until it is done."""
    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, **job})
    assert resp.status_code == 202, resp.text
    thread = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
    thread.start()
    thread.join(240)
    return client.get(f"/v1/jobs/{resp.json()['id']}").json()


def predicted(client, model_id: str) -> list[dict]:
    resp = client.post(f"/v1/models/{model_id}/predict", params={"top_k": 2},
                       files=[("file", (p.name, p.read_bytes())) for p in PHOTOS])
    assert resp.status_code == 200, resp.text
    return [{p["label"]: p["score"] for p in r["predictions"]} for r in resp.json()["results"]]


def assert_onnx_answers_like_predict(client, model_id: str, tmp_path) -> None:
    resp = client.get(f"/v1/models/{model_id}/export", params={"format": "onnx"})
    assert resp.status_code == 200, resp.text
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    (tmp_path / "model.onnx").write_bytes(zf.read("model.onnx"))
    manifest = json.loads(zf.read("manifest.json"))
    x = batch_of(PHOTOS, Preprocessing.from_dict(manifest["preprocessing"])).numpy()
    # logits, probabilities (and the OOD score, for models that keep one)
    probs = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": np.ascontiguousarray(x)})[1]
    for served, row in zip(predicted(client, model_id), probs):
        for label, score in served.items():
            assert abs(score - float(row[manifest["classes"].index(label)])) < 1e-4


def test_a_registered_backbone_trains_serves_and_exports_like_a_built_in_one(api, settings, tmp_path):
    client, dataset_id, weights = api
    listed = {b["name"]: b for b in client.get("/v1/backbones").json()}
    mine = listed["tiny-eff"]
    assert (mine["source"], mine["weights_available"], mine["input_size"], mine["feature_dim"], mine["fine_tune_top"],
            mine["timm_arch"], mine["weights_bytes"]) == ("registered", True, 160, 256, True, TINY_EFFICIENTNET,
                                                          weights.stat().st_size)
    assert len(mine["sha256"]) == 64 and mine["weights_path"] == str(weights)
    vit = listed[f"timm/{TINY_VIT}"]
    assert (vit["source"], vit["weights_available"], vit["fixed_input_size"], vit["fine_tune_top"]) == (
        "timm", True, True, True)
    assert listed["efficientnet_lite0"]["source"] == "package"

    probe = train(client, settings, dataset_id, backbone="tiny-eff", strategy="linear_probe", image_size=64, epochs=3)
    assert probe["status"] == "succeeded", probe
    model = client.get(f"/v1/models/{probe['model_id']}").json()
    assert model["backbone"] == "tiny-eff"
    assert len(predicted(client, probe["model_id"])) == len(PHOTOS)  # served on the shared registered backbone

    top = train(client, settings, dataset_id, backbone="tiny-eff", strategy="fine_tune_top", image_size=64, epochs=2)
    assert top["status"] == "succeeded", top
    assert_onnx_answers_like_predict(client, top["model_id"], tmp_path)

    remove_entry(settings.backbone_registry_file, "tiny-eff")  # the operator takes it away: a 409 that says so
    with TestClient(create_app(settings)) as fresh:  # a new API process: nothing loaded yet
        resp = fresh.post(f"/v1/models/{probe['model_id']}/predict", files={"file": ("a.jpg", PHOTOS[0].read_bytes())})
    assert resp.status_code == 409 and "unknown backbone 'tiny-eff'" in resp.json()["detail"], resp.text


def test_a_timm_vit_from_the_hugging_face_cache_trains_top_and_exports(api, settings, tmp_path):
    client, dataset_id, _ = api
    job = train(client, settings, dataset_id, backbone="timm/test_vit", strategy="linear_probe", epochs=2)
    assert job["status"] == "succeeded", job
    model = client.get(f"/v1/models/{job['model_id']}").json()
    assert model["backbone"] == f"timm/{TINY_VIT}"
    assert_onnx_answers_like_predict(client, job["model_id"], tmp_path)

    top = train(client, settings, dataset_id, backbone="timm/test_vit", strategy="fine_tune_top", epochs=2)
    assert top["status"] == "succeeded", top  # trained on cached tokens, served as the whole network
    assert_onnx_answers_like_predict(client, top["model_id"], tmp_path)


def test_a_job_whose_backbone_this_worker_does_not_know_fails_once_saying_what_to_do(api, settings):
    """The API accepted the job; the operator removed the backbone before a worker took it (or
    registered it on the API's machine only): one attempt, the user's error, not a crash retried."""
    client, dataset_id, _ = api
    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "tiny-eff", "strategy": "linear_probe",
                                         "image_size": 64})
    assert resp.status_code == 202, resp.text
    remove_entry(settings.backbone_registry_file, "tiny-eff")
    Worker(settings).run(max_jobs=1)
    job = client.get(f"/v1/jobs/{resp.json()['id']}").json()
    assert (job["status"], job["attempts"], job["error"]["code"]) == ("failed", 1, "invalid_config"), job
    assert "tiny-eff" in job["error"]["message"] and "graft backbones add" in job["error"]["message"]


def test_missing_or_tampered_weights_fail_the_job_at_once_saying_what_to_do(api, settings):
    client, dataset_id, weights = api
    missing = train(client, settings, dataset_id, backbone="timm/test_resnet", strategy="linear_probe", image_size=64)
    assert (missing["status"], missing["attempts"], missing["error"]["code"]) == ("failed", 1, "weights_missing")
    assert "models--timm--test_resnet.r160_in1k" in missing["error"]["message"]
    assert "graft backbones add timm/test_resnet.r160_in1k" in missing["error"]["message"]

    write_safetensors(weights, random_weights(TINY_EFFICIENTNET, 99))  # the operator's file changed
    tampered = train(client, settings, dataset_id, backbone="tiny-eff", strategy="linear_probe", image_size=64)
    assert (tampered["status"], tampered["attempts"], tampered["error"]["code"]) == ("failed", 1, "weights_mismatch")
    assert str(weights) in tampered["error"]["message"] and "sha256" in tampered["error"]["message"]

    resp = client.post("/v1/jobs", json={"dataset_id": dataset_id, "backbone": "timm/test_vit", "image_size": 64})
    assert resp.status_code == 422 and "160x160" in resp.text
