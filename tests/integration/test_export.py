"""Exports a user takes away: ONNX (run in onnxruntime), TorchScript and safetensors, each with
the preprocessing manifest, matching what Graft itself computes on real photos."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from service.serving.exports import Exporter
from service.settings import Settings
from tests.support.data import hymenoptera_files
from tests.support.training import api_with_trained_probe
from workers.artifacts import Classifier, load_artifact, sha256_file, write_artifact
from workers.backbones import get_backbone
from workers.preprocessing import decode_square, eval_crop, normalize

ANT, BEE = 310, 309  # ImageNet class indices


def batch_of(paths, pre) -> torch.Tensor:
    """What /predict feeds the network: Graft's own decode, crop and normalization."""
    return normalize(eval_crop(torch.stack([decode_square(p.read_bytes(), pre) for p in paths]), pre), pre)


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory):
    """A Graft artifact whose head is Lite0's own ImageNet classifier: 1000 classes whose right
    answers on ants and bees are known, with calibration and mirror averaging switched on."""
    data_dir = tmp_path_factory.mktemp("export-data")
    spec = get_backbone("efficientnet_lite0")
    classifier = Classifier(spec.build_features(pretrained=True), spec.feature_dim, 1000)
    classifier.head.load_state_dict(spec.build_imagenet_classifier().classifier.state_dict())
    classifier.temperature, classifier.tta_flip = 1.7, True
    manifest = {"model_id": "imagenet", "backbone": spec.name, "classes": [f"imagenet_{i}" for i in range(1000)],
                "preprocessing": spec.preprocessing.to_dict()}
    path, digest, _ = write_artifact(data_dir / "models", "imagenet", classifier.eval(), manifest)
    row = SimpleNamespace(id="imagenet", sha256=digest, artifact_dir=str(path.relative_to(data_dir)))
    return data_dir, row


def open_export(zip_path) -> tuple[zipfile.ZipFile, dict]:
    zf = zipfile.ZipFile(zip_path)
    return zf, json.loads(zf.read("manifest.json"))


def test_onnx_matches_pytorch_on_real_photos(imagenet_model, tmp_path):
    data_dir, row = imagenet_model
    zip_path = Exporter(Settings(data_dir=data_dir)).export(row, "onnx")
    zf, manifest = open_export(zip_path)
    assert sorted(zf.namelist()) == ["USAGE.md", "manifest.json", "model.onnx"]
    exp = manifest["export"]
    assert exp["format"] == "onnx" and exp["input"]["shape"] == ["batch", 3, 224, 224]
    assert [o["name"] for o in exp["outputs"]] == ["logits", "probabilities"]
    assert manifest["preprocessing"]["resize_size"] == 256 and manifest["classes"][ANT] == f"imagenet_{ANT}"
    (tmp_path / "model.onnx").write_bytes(zf.read("model.onnx"))
    assert sha256_file(tmp_path / "model.onnx") == exp["file_sha256"]

    loaded = load_artifact(data_dir / row.artifact_dir, row.sha256)
    photos = hymenoptera_files("val", "ants")[:4] + hymenoptera_files("val", "bees")[:4]
    x = batch_of(photos, loaded.preprocessing)
    expected = loaded.classifier.predict_proba(x).numpy()  # exactly what /predict computes
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probs = session.run(None, {"input": np.ascontiguousarray(x.numpy())})
    assert probs.shape == (8, 1000)
    assert np.abs(probs - expected).max() < 1e-4
    assert (probs.argmax(1) == expected.argmax(1)).all()
    # The batch dimension is dynamic: one image alone gives the same answer.
    single = session.run(["probabilities"], {"input": np.ascontiguousarray(x[:1].numpy())})[0]
    assert np.abs(single - expected[:1]).max() < 1e-4
    # And the preprocessing in the manifest is the right one: ImageNet's ant and bee come out on top.
    top1 = probs.argmax(1)
    assert (top1[:4] == ANT).sum() + (top1[4:] == BEE).sum() >= 6, top1


def test_torchscript_and_safetensors_exports(imagenet_model, tmp_path):
    data_dir, row = imagenet_model
    loaded = load_artifact(data_dir / row.artifact_dir, row.sha256)
    x = batch_of(hymenoptera_files("val", "bees")[:3], loaded.preprocessing)
    expected = loaded.classifier.predict_proba(x)

    zf, manifest = open_export(Exporter(Settings(data_dir=data_dir)).export(row, "torchscript"))
    (tmp_path / "m.pt").write_bytes(zf.read("model.torchscript.pt"))
    scripted = torch.jit.load(str(tmp_path / "m.pt"), map_location="cpu")
    _, probs = scripted(x.contiguous())
    assert torch.allclose(probs, expected, atol=1e-5)
    assert manifest["export"]["temperature"] == pytest.approx(1.7) and manifest["export"]["tta_flip"] is True

    zf, manifest = open_export(Exporter(Settings(data_dir=data_dir)).export(row, "safetensors"))
    weights = zf.read("model.safetensors")  # standalone: the full weights, also for a shared-backbone model
    assert manifest["sha256"] == row.sha256 and manifest["serving"]["temperature"] == pytest.approx(1.7)
    (tmp_path / "w.safetensors").write_bytes(weights)
    assert set(load_file(str(tmp_path / "w.safetensors"))) == set(loaded.classifier.state_dict())


def test_an_export_is_built_once_and_then_served_from_cache(imagenet_model):
    data_dir, row = imagenet_model
    exporter = Exporter(Settings(data_dir=data_dir))
    first = exporter.export(row, "safetensors")
    mtime = first.stat().st_mtime_ns
    assert exporter.export(row, "safetensors") == first and first.stat().st_mtime_ns == mtime
    assert not [p for p in (data_dir / "exports").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real model: upload through the API, train with a worker, all in this process."""
    with api_with_trained_probe(tmp_path_factory.mktemp("export-api") / "data") as (_, client, dataset, job):
        queued = client.post("/v1/jobs", json={"dataset_id": dataset["id"]}).json()  # never runs
        yield client, job, queued


def test_export_endpoint_gives_a_zip_whose_onnx_answers_like_predict(trained, tmp_path):
    client, job, _ = trained
    resp = client.get(f"/v1/models/{job['model_id']}/export", params={"format": "onnx"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/zip"
    assert f'graft-{job["model_id"]}-onnx.zip' in resp.headers["content-disposition"]
    zf, manifest = open_export(io.BytesIO(resp.content))
    assert manifest["classes"] == ["ants", "bees"] and manifest["preprocessing"]["input_size"] == 64
    assert "onnxruntime" in zf.read("USAGE.md").decode()
    (tmp_path / "model.onnx").write_bytes(zf.read("model.onnx"))

    photos = hymenoptera_files("val", "ants")[5:7] + hymenoptera_files("val", "bees")[5:7]
    answer = client.post(f"/v1/models/{job['model_id']}/predict", params={"top_k": 2},
                         files=[("file", (p.name, p.read_bytes())) for p in photos]).json()
    from workers.backbones import Preprocessing

    x = batch_of(photos, Preprocessing.from_dict(manifest["preprocessing"])).numpy()
    # logits, probabilities (and the OOD score, for models that keep one)
    probs = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": np.ascontiguousarray(x)})[1]
    for result, row in zip(answer["results"], probs):
        served = {p["label"]: p["score"] for p in result["predictions"]}
        assert max(abs(served[c] - float(row[i])) for i, c in enumerate(manifest["classes"])) < 1e-4
        assert result["predictions"][0]["label"] == manifest["classes"][int(row.argmax())]

    # USAGE.md's onnxruntime snippet runs as written next to the unzipped files.
    zf.extractall(tmp_path / "unzipped")
    shutil.copy(photos[0], tmp_path / "unzipped" / "photo.jpg")
    snippet = zf.read("USAGE.md").decode().split("```python\n", 1)[1].split("```", 1)[0]
    ran = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path / "unzipped", capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split()[0] in manifest["classes"]

    by_job_id = client.get(f"/v1/models/{job['id']}/export", params={"format": "safetensors"})
    assert by_job_id.status_code == 200  # a finished job's id works, as for /predict


def test_export_errors_are_problems_a_user_can_act_on(trained):
    client, job, queued = trained
    bad = client.get(f"/v1/models/{job['model_id']}/export", params={"format": "pickle"})
    assert bad.status_code == 422 and "onnx" in bad.json()["detail"]
    missing = client.get("/v1/models/nope/export")
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")
    not_ready = client.get(f"/v1/models/{queued['id']}/export")
    assert not_ready.status_code == 409 and "not ready" in not_ready.json()["detail"]
