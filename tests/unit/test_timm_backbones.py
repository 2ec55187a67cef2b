"""timm/<model> and registered backbones: weights resolved offline in the documented order
(registered file, Hugging Face cache, download only when allowed), verified by sha256, with the
preprocessing of the model's own pretrained config and the stages of its feature_info. The weights
are real timm architectures with random values that each test writes itself."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from pydantic import ValidationError
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T

from tests.support.timm_weights import (TINY_CONVNEXT, TINY_EFFICIENTNET, TINY_RESNET, TINY_VIT, fake_hub,  # noqa: F401
                                        hf_home, no_network, random_weights, registry, write_hf_cache, write_safetensors)
from workers.backbone_registry import RegistryError, read_registry
from workers.backbones import (BACKBONES, BackboneUnsupported, WeightsMismatch, WeightsUnavailable, builtin_backbones,
                               get_backbone)
from workers.config import TrainConfig
from workers.timm_backbones import cached_timm_backbones, preprocessing_of, register, timm_spec

BUILTIN = {s.name for s in builtin_backbones()}


def features_equal(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Every tensor of the features module is the file's (the classifier is gone)."""
    own = module.state_dict()
    return bool(own) and all(torch.equal(v, state[k]) for k, v in own.items())


# --- what comes from timm ------------------------------------------------------------------------

@pytest.mark.parametrize("model", [TINY_EFFICIENTNET, TINY_RESNET, TINY_CONVNEXT, TINY_VIT,
                                   "convnext_small.fb_in22k_ft_in1k", "vit_base_patch14_dinov2.lvd142m",
                                   "regnety_016.tv2_in1k", "resnet50.a1_in1k"])
def test_preprocessing_is_timms_own_eval_transform(model):
    spec = get_backbone(f"timm/{model}")
    assert spec.name == f"timm/{model}" and spec.source == "timm"
    pre = spec.preprocessing
    steps = create_transform(**resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(model).to_dict()))
    resize, crop, _, normalize = steps.transforms
    assert isinstance(resize, T.Resize) and isinstance(crop, T.CenterCrop)
    assert resize.size == pre.resize_size and tuple(crop.size) == (pre.input_size, pre.input_size)
    assert resize.interpolation.value == pre.interpolation
    assert tuple(normalize.mean.tolist()) == pytest.approx(pre.mean) and tuple(normalize.std.tolist()) == pytest.approx(pre.std)


def test_a_name_without_a_tag_is_timms_default_weights():
    assert get_backbone("timm/test_resnet").name == f"timm/{TINY_RESNET}"
    assert "timm/test_resnet" in BACKBONES and "timm/no_such_model_at_all" not in BACKBONES
    with pytest.raises(KeyError, match="timm/<model>"):
        get_backbone("timm/no_such_model_at_all")


@pytest.mark.parametrize("model", [TINY_EFFICIENTNET, TINY_RESNET, TINY_CONVNEXT, TINY_VIT])
def test_feature_dim_and_stages_come_from_the_model(model):
    spec = get_backbone(f"timm/{model}")
    features = spec.build_features(pretrained=False)
    side = spec.preprocessing.input_size if spec.fixed_input_size else 64
    with torch.inference_mode():
        assert features(torch.randn(2, 3, side, side)).shape == (2, spec.feature_dim)
    staged = [id(p) for stage in spec.stages(features) for p in stage.parameters()]
    assert staged == [id(p) for p in features.parameters()], "every parameter once, in order"
    points = [f["module"] for f in features.feature_info]
    groups = [g.split() for g in spec.stage_groups]
    # one of timm's feature points per stage, in order; at most the head's parameters follow the last one
    assert [[u for u in g if u in points] for g in groups[:len(points)]] == [[p] for p in points]
    assert len(groups) in (len(points), len(points) + 1) and not set(groups[-1]) & set(points[:-1])
    assert spec.fixed_input_size == (model == TINY_VIT)


def test_preprocessing_graft_cannot_reproduce_is_refused_with_the_reason():
    cfg = timm.models.get_pretrained_cfg(TINY_RESNET)
    for change, says in (({"crop_mode": "squash"}, "crop_mode 'squash'"), ({"interpolation": "nearest"}, "nearest"),
                         ({"input_size": (3, 160, 128)}, "square")):
        with pytest.raises(BackboneUnsupported, match=says):
            preprocessing_of("timm/x", type(cfg)(**{**cfg.to_dict(), **change}))


def test_a_fixed_size_vit_refuses_other_image_sizes_in_the_job():
    with pytest.raises(ValidationError, match="takes 160x160 images only"):
        TrainConfig(backbone=f"timm/{TINY_VIT}", strategy="linear_probe", image_size=64)
    assert TrainConfig(backbone=f"timm/{TINY_VIT}", strategy="linear_probe").image_size == 160
    with pytest.raises(ValidationError, match="takes 224x224 images only"):
        TrainConfig(backbone="vit_b_16", strategy="linear_probe", image_size=160)


# --- where the weights come from ------------------------------------------------------------------

def test_weights_in_the_hugging_face_cache_load_offline(hf_home, no_network):
    state = random_weights(TINY_RESNET, seed=1)
    snapshot = write_hf_cache(hf_home, f"timm/{TINY_RESNET}", state)
    spec = get_backbone(f"timm/{TINY_RESNET}")
    assert spec.weights_available() and spec.weights_path() == snapshot
    assert features_equal(spec.build_features(pretrained=True), state)
    assert cached_timm_backbones() == [f"timm/{TINY_RESNET}"]


def test_pytorch_bin_in_the_cache_loads_with_weights_only(hf_home, no_network, tmp_path):
    state = random_weights(TINY_EFFICIENTNET, seed=2)
    repo = hf_home / f"models--timm--{TINY_EFFICIENTNET}"
    snapshot = repo / "snapshots" / ("a" * 40) / "pytorch_model.bin"
    snapshot.parent.mkdir(parents=True)
    torch.save(state, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    spec = get_backbone(f"timm/{TINY_EFFICIENTNET}")
    assert spec.weights_path() == snapshot
    assert features_equal(spec.build_features(pretrained=True), state)


def test_a_registered_file_comes_before_the_cache(hf_home, registry, no_network, tmp_path):
    write_hf_cache(hf_home, f"timm/{TINY_RESNET}", random_weights(TINY_RESNET, seed=1))
    mine = random_weights(TINY_RESNET, seed=2)
    spec = register(registry, "timm/test_resnet", write_safetensors(tmp_path / "mine.safetensors", mine), None, BUILTIN)
    assert spec.name == f"timm/{TINY_RESNET}" and spec.source == "registered"
    assert get_backbone(f"timm/{TINY_RESNET}").weights_path() == tmp_path / "mine.safetensors"
    assert features_equal(get_backbone(f"timm/{TINY_RESNET}").build_features(pretrained=True), mine)


def test_missing_weights_say_which_file_to_provide_and_nothing_is_downloaded(hf_home, no_network):
    spec = get_backbone(f"timm/{TINY_CONVNEXT}")
    assert not spec.weights_available()
    with pytest.raises(WeightsUnavailable) as exc:
        spec.build_features(pretrained=True)
    message = str(exc.value)
    expected = hf_home / f"models--timm--{TINY_CONVNEXT}" / "snapshots"
    assert str(expected) in message and "model.safetensors" in message
    assert f"graft backbones add timm/{TINY_CONVNEXT}" in message and "GRAFT_ALLOW_DOWNLOADS=1" in message


def test_downloads_allowed_go_to_the_hub_only_when_the_weights_are_missing(hf_home, fake_hub, tmp_path):
    state = random_weights(TINY_CONVNEXT, seed=3)
    fake_hub.files[(f"timm/{TINY_CONVNEXT}", "model.safetensors")] = write_safetensors(
        tmp_path / "served.safetensors", state).read_bytes()
    spec = get_backbone(f"timm/{TINY_CONVNEXT}")
    with pytest.raises(WeightsUnavailable):
        spec.build_features(pretrained=True)  # downloads off
    assert not fake_hub.requests
    assert features_equal(spec.build_features(pretrained=True, allow_downloads=True), state)
    assert f"GET /timm/{TINY_CONVNEXT}/resolve/main/model.safetensors" in fake_hub.requests
    assert spec.weights_path().resolve().parent == hf_home / f"models--timm--{TINY_CONVNEXT}" / "blobs"
    asked = len(fake_hub.requests)
    assert features_equal(spec.build_features(pretrained=True, allow_downloads=True), state)
    assert len(fake_hub.requests) == asked, "the second time it is read from the cache"


def test_a_repo_without_safetensors_falls_back_to_pytorch_bin_and_a_failed_download_says_so(hf_home, fake_hub,
                                                                                           tmp_path):
    state = random_weights(TINY_RESNET, seed=3)
    torch.save(state, tmp_path / "served.bin")
    fake_hub.files[(f"timm/{TINY_RESNET}", "pytorch_model.bin")] = (tmp_path / "served.bin").read_bytes()
    assert features_equal(get_backbone(f"timm/{TINY_RESNET}").build_features(pretrained=True, allow_downloads=True),
                          state)
    with pytest.raises(WeightsUnavailable, match=f"timm/{TINY_EFFICIENTNET} has none of model.safetensors"):
        get_backbone(f"timm/{TINY_EFFICIENTNET}").build_features(pretrained=True, allow_downloads=True)


def test_a_damaged_cache_blob_is_refused(hf_home, no_network):
    snapshot = write_hf_cache(hf_home, f"timm/{TINY_RESNET}", random_weights(TINY_RESNET, seed=1))
    other = random_weights(TINY_RESNET, seed=9)
    write_safetensors(snapshot.resolve(), other)  # same name (the old sha256), other bytes
    with pytest.raises(WeightsMismatch, match="sha256"):
        get_backbone(f"timm/{TINY_RESNET}").build_features(pretrained=True)


# --- the registry -----------------------------------------------------------------------------------

def test_register_records_the_file_and_its_sha256(registry, no_network, tmp_path):
    from workers.artifacts import sha256_file

    state = random_weights(TINY_EFFICIENTNET, seed=4)
    file = write_safetensors(tmp_path / "w" / "eff.safetensors", state)
    spec = register(registry, "my-eff", file, "test_efficientnet", BUILTIN)
    entry = read_registry(registry)["my-eff"]
    assert (entry.timm_arch, entry.file, entry.sha256, entry.size_bytes) == (
        TINY_EFFICIENTNET, str(file), sha256_file(file), file.stat().st_size)
    assert "my-eff" in BACKBONES and "my-eff" in list(BACKBONES) and BACKBONES["my-eff"] == spec
    assert spec.preprocessing == get_backbone(f"timm/{TINY_EFFICIENTNET}").preprocessing
    assert features_equal(get_backbone("my-eff").build_features(pretrained=True), state)
    assert TrainConfig(backbone="my-eff", strategy="fine_tune_top").image_size == 160


def test_a_tampered_registered_file_is_refused(registry, tmp_path):
    file = write_safetensors(tmp_path / "eff.safetensors", random_weights(TINY_EFFICIENTNET, seed=4))
    register(registry, "my-eff", file, TINY_EFFICIENTNET, BUILTIN)
    write_safetensors(file, random_weights(TINY_EFFICIENTNET, seed=5))
    with pytest.raises(WeightsMismatch, match=r"sha256 .* not the .* recorded"):
        get_backbone("my-eff").build_features(pretrained=True)
    file.unlink()
    with pytest.raises(WeightsUnavailable, match=f"{file} is not there"):
        get_backbone("my-eff").build_features(pretrained=True)


def test_a_features_only_file_and_a_pytorch_file_register(registry, tmp_path):
    headless = random_weights(TINY_CONVNEXT, seed=6, num_classes=0)
    spec = register(registry, "convnext-features", write_safetensors(tmp_path / "f.safetensors", headless),
                    TINY_CONVNEXT, BUILTIN)
    assert features_equal(spec.build_features(pretrained=True), headless)
    state = random_weights(TINY_VIT, seed=7)
    torch.save({"state_dict": state}, tmp_path / "vit.pth")
    spec = register(registry, "vit-pth", tmp_path / "vit.pth", TINY_VIT, BUILTIN)
    assert features_equal(spec.build_features(pretrained=True), {k: v for k, v in state.items()
                                                                  if not k.startswith("head.")})


@pytest.mark.parametrize("name, arch, says", [
    ("resnet18", TINY_RESNET, "built-in"),
    ("Bad Name", TINY_RESNET, "lowercase"),
    ("mine", None, "--timm-arch"),
    ("mine", "no_such_model", "no pretrained model"),
    ("timm/test_resnet", TINY_VIT, "leave --timm-arch out"),
])
def test_registrations_that_cannot_be_made_say_why(registry, tmp_path, name, arch, says):
    file = write_safetensors(tmp_path / "r.safetensors", random_weights(TINY_RESNET))
    with pytest.raises(RegistryError, match=says):
        register(registry, name, file, arch, BUILTIN)
    assert not registry.exists()


def test_a_file_of_another_architecture_or_a_second_registration_is_refused(registry, tmp_path):
    file = write_safetensors(tmp_path / "r.safetensors", random_weights(TINY_RESNET))
    with pytest.raises(WeightsMismatch, match=f"does not hold weights of the timm architecture {TINY_EFFICIENTNET}"):
        register(registry, "wrong", file, TINY_EFFICIENTNET, BUILTIN)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RegistryError, match="safetensors"):
        register(registry, "text", tmp_path / "notes.txt", TINY_RESNET, BUILTIN)
    register(registry, "res", file, TINY_RESNET, BUILTIN)
    with pytest.raises(RegistryError, match="already registered"):
        register(registry, "res", file, TINY_RESNET, BUILTIN)
    assert list(read_registry(registry)) == ["res"]


class Payload:  # any object a pickle may carry: weights_only refuses to build it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickle_that_is_not_a_state_dict_is_not_unpickled(registry, tmp_path, capsys):
    torch.save({"weights": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightsMismatch, match="weights_only"):
        register(registry, "evil", tmp_path / "evil.pth", TINY_RESNET, BUILTIN)
    assert "unpickled!" not in capsys.readouterr().out


def test_a_hand_written_registry_is_read_and_a_broken_one_says_so(registry, tmp_path):
    from workers.artifacts import sha256_file

    file = write_safetensors(tmp_path / "r.safetensors", random_weights(TINY_RESNET, seed=3))
    registry.write_text(json.dumps({"version": 1, "backbones": {
        "by-hand": {"timm_arch": TINY_RESNET, "file": str(file), "sha256": sha256_file(file)}}}))
    assert get_backbone("by-hand").timm.registered.file == str(file)
    registry.write_text("{not json")
    assert "by-hand" not in list(BACKBONES)  # a listing logs it and goes on
    with pytest.raises(RegistryError, match="cannot be read"):
        get_backbone("by-hand")


def test_timm_specs_are_cached_per_registration():
    assert timm_spec(f"timm/{TINY_RESNET}", TINY_RESNET) is timm_spec(f"timm/{TINY_RESNET}", TINY_RESNET)


def test_backbones_registered_for_auto_are_its_candidates_when_their_weights_are_here(registry, tmp_path):
    from workers.backbones import AUTO_BACKBONES, auto_candidates

    chosen = write_safetensors(tmp_path / "a.safetensors", random_weights(TINY_RESNET, seed=1))
    register(registry, "for-auto", chosen, TINY_RESNET, BUILTIN, auto=True)
    register(registry, "not-for-auto", write_safetensors(tmp_path / "b.safetensors", random_weights(TINY_RESNET, 2)),
             TINY_RESNET, BUILTIN)
    assert auto_candidates() == (*AUTO_BACKBONES, "for-auto")
    assert read_registry(registry)["for-auto"].auto and not read_registry(registry)["not-for-auto"].auto
    chosen.unlink()
    assert auto_candidates() == AUTO_BACKBONES


def test_a_partial_fine_tune_of_a_timm_vit_trains_its_last_stages_only(registry, tmp_path):
    from tests.support.training import Recorder, tiny_data
    from workers.training import train

    state = random_weights(TINY_VIT, seed=8)
    spec = register(registry, "tiny-vit", write_safetensors(tmp_path / "vit.safetensors", state), TINY_VIT, BUILTIN)
    config = TrainConfig(backbone="tiny-vit", strategy="partial", unfreeze_stages=2, epochs=1, batch_size=4,
                         learning_rate=1e-2)
    data = tiny_data(3, 2, pre=spec.preprocessing)
    pristine = spec.build_features(pretrained=True)
    result = train(config, data, spec.build_features(pretrained=True), spec.feature_dim, Recorder(), torch.device("cpu"))
    tuned = result.classifier.features.state_dict()
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
               for k, v in pristine.state_dict().items() if not torch.equal(v, tuned[k])}
    assert changed == {"blocks.5", "norm"}, changed  # the last block and the final norm: 2 stages


def _tiny_vit_top(registry, tmp_path, **overrides):
    """A registered tiny ViT (random weights), its tokens cached over a few photos, and its top trained
    by fine_tune_top: (spec, pristine features, data, activations, classifier)."""
    from tests.support.training import Recorder, tiny_data
    from workers.training.top import StageActivations, fit_top

    state = random_weights(TINY_VIT, seed=9)
    spec = register(registry, "tiny-vit", write_safetensors(tmp_path / "vit.safetensors", state), TINY_VIT, BUILTIN)
    config = TrainConfig(**{"backbone": "tiny-vit", "strategy": "fine_tune_top", "epochs": 2, "batch_size": 4,
                            "learning_rate": 1e-2, "unfreeze_stages": 2, **overrides})
    data = tiny_data(3, 2, pre=spec.preprocessing)
    pristine = spec.build_features(pretrained=True)
    cpu = torch.device("cpu")
    acts = StageActivations.compute(pristine, spec, data.labeled_x(), spec.preprocessing, config.unfreeze_stages, cpu,
                                    Recorder())
    train_idx = torch.arange(len(data.train_y))
    classifier = fit_top(config, pristine, spec, acts, train_idx, data.train_y, 2, Recorder(), cpu)
    return spec, pristine, data, acts, classifier


@pytest.mark.parametrize("k, bn_mode, trained", [(1, "adabn", {"norm"}), (2, "train", {"blocks.5", "norm"})])
def test_fine_tune_top_of_a_timm_vit_trains_its_last_stages_on_cached_tokens_only(registry, tmp_path, k, bn_mode,
                                                                                  trained):
    from tests.support.training import Recorder
    from workers.decoded_cache import SCRATCH
    from workers.training.top import StageActivations

    # MixUp of tokens, and BatchNorm modes that find no BatchNorm in a LayerNorm network
    spec, pristine, data, acts, classifier = _tiny_vit_top(registry, tmp_path, unfreeze_stages=k, bn_mode=bn_mode,
                                                           mixup_alpha=0.4, mix_prob=1.0)
    tokens = 1 + (160 // 16) ** 2  # the class token, then the patches
    assert acts.acts.dtype == torch.float16 and acts.acts.shape == (len(data.labeled_x()), tokens, 64)
    assert not torch.equal(acts.acts, acts.acts_mirror)
    saved = SCRATCH.max_bytes, SCRATCH.root
    SCRATCH.configure(1024, tmp_path / "scratch")  # past the worker's memory budget: a mapped scratch file
    try:
        spilled = StageActivations.compute(pristine, spec, data.labeled_x(), spec.preprocessing, k,
                                           torch.device("cpu"), Recorder())
    finally:
        SCRATCH.configure(*saved)
    with open("/proc/self/maps") as maps:
        assert str(tmp_path / "scratch") in maps.read()
    assert torch.equal(spilled.acts, acts.acts) and torch.equal(spilled.acts_mirror, acts.acts_mirror)
    before, tuned = pristine.state_dict(), classifier.features.state_dict()
    changed = {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
               for k, v in before.items() if not torch.equal(v, tuned[k])}
    assert changed == trained, changed  # the class token, position embedding and other blocks bit-identical


def test_a_timm_vit_top_serves_the_features_and_probabilities_it_was_scored_on(registry, tmp_path):
    from workers.artifacts import load_artifact, write_artifact
    from workers.ood import served_features
    from workers.preprocessing import eval_crop, normalize
    from workers.training.top import top_outputs

    spec, _, data, acts, classifier = _tiny_vit_top(registry, tmp_path, tta_flip=True)
    classifier.tta_flip = True
    pre = spec.preprocessing
    _, digest, _ = write_artifact(tmp_path / "models", "m", classifier,
                                  {"backbone": spec.name, "classes": data.classes, "preprocessing": pre.to_dict()})
    served = load_artifact(tmp_path / "models" / "m", digest).classifier  # what /predict loads and runs
    x = normalize(eval_crop(data.val_x, pre), pre)
    with torch.inference_mode():
        feats = served_features(served.features(x), served.features(x.flip(-1)))
        probs = served.predict_proba(x)
    val = torch.arange(len(data.train_y), len(acts))
    logits, cached = top_outputs(classifier, spec, 2, acts, val, tta_flip=True)
    assert (feats - cached).abs().max() < 0.01 * cached.abs().max()
    assert (probs - torch.softmax(logits / classifier.temperature, dim=1)).abs().max() < 0.01


def test_auto_on_a_timm_vit_cross_validates_fine_tune_top_among_its_candidates(registry, tmp_path):
    import dataclasses

    from tests.support.training import Recorder, tiny_data
    from workers.training import train

    state = random_weights(TINY_VIT, seed=10)
    spec = register(registry, "tiny-vit", write_safetensors(tmp_path / "vit.safetensors", state), TINY_VIT, BUILTIN)
    data = dataclasses.replace(tiny_data(6, 3, pre=spec.preprocessing), val_given=False)
    result = train(TrainConfig(strategy="auto", backbone="tiny-vit", time_budget_s=120), data,
                   spec.build_features(pretrained=True), spec.feature_dim, Recorder(), torch.device("cpu"))
    tops = [c for c in result.metrics["auto"]["candidates"] if c["recipe"]["strategy"] == "fine_tune_top"]
    assert len(tops) == 1 and tops[0]["scored_on"] == "out of fold", result.metrics["auto"]["candidates"]
