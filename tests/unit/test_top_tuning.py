"""fine_tune_top: the last k stages trained on cached activations, on a dozen real photos at 64 px."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tests.support.training import PRE, SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.artifacts import load_artifact, write_artifact
from workers.backbones import get_backbone
from workers.config import TrainConfig
from workers.preprocessing import eval_crop, normalize
from workers.training import PreparedData, train
from workers.training.top import (StageActivations, bottom_of, fit_top, supports_top_tuning, top_logits, top_of,
                                  train_top)

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
TRAINED = ("blocks.6.", "conv_head.", "bn2.")  # Lite0's last 2 stages


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return tiny_data()


@pytest.fixture(scope="module")
def pretrained():
    return SPEC.build_features(pretrained=True)


@pytest.fixture(scope="module")
def acts(data, pretrained) -> StageActivations:
    return StageActivations.compute(pretrained, SPEC, data.train_x, PRE, 2, CPU, Recorder())


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"strategy": "fine_tune_top", "epochs": 2, "batch_size": 4, "image_size": 64, "seed": 3,
                          **overrides})


def fit(pretrained, acts, data, **overrides):
    idx = torch.arange(len(data.train_y))
    return fit_top(config(**overrides), pretrained, SPEC, acts, idx, data.train_y, 2, Recorder(), CPU)


def backbone(classifier) -> dict[str, torch.Tensor]:
    return classifier.features.state_dict()


def is_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


# --- the cut -----------------------------------------------------------------------------------

# Every layout top.py cuts: the Lites, torchvision's ResNets and RegNets, and each timm family it
# lists (_TIMM_SEQUENTIAL), on small members of the family; timm's ViTs pooled by their class token,
# by the mean of their tokens (register tokens, no class token) and by attention.
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "regnet_y_1_6gf", "timm/test_efficientnet",
                                  "timm/test_resnet", "timm/test_convnext", "timm/test_byobnet", "timm/regnetx_002",
                                  "timm/mobilenetv3_small_050", "timm/test_vit", "timm/test_vit2", "timm/test_vit3"])
def test_bottom_then_top_equals_the_backbones_own_forward_at_every_cut(name):
    spec = get_backbone(name)
    features = spec.build_features(pretrained=False)  # the architecture is what is cut; no weights needed
    torch.nn.init.normal_(next(features.parameters()))  # not the symmetric initialisation alone (a ViT: its tokens)
    side = spec.preprocessing.input_size if spec.fixed_input_size else 64
    x = torch.randn(2, 3, side, side).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        full = features(x)
        for k in range(1, len(spec.stages(features)) + 1):
            assert (top_of(features, spec, k)(bottom_of(features, spec, k)(x)) - full).abs().max() < 1e-5, k


def test_torchvisions_vit_is_cut_after_its_class_token_and_position_embedding():
    spec = get_backbone("vit_b_16")  # 86M parameters at 224 px: two cuts, not all thirteen
    features = spec.build_features(pretrained=False)
    torch.nn.init.normal_(features.class_token)
    x = torch.randn(2, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        full = features(x)
        last = len(spec.stages(features)) - 1  # every encoder layer and the final LayerNorm above the cut
        tokens = bottom_of(features, spec, last)(x)
        assert tokens.shape == (2, 1 + 14 * 14, 768)
        assert (top_of(features, spec, last)(tokens) - full).abs().max() < 1e-4
        assert (top_of(features, spec, 1)(bottom_of(features, spec, 1)(x)) - full).abs().max() < 1e-4
    bottom = {id(p) for p in bottom_of(features, spec, last).parameters()}
    assert bottom == {id(p) for p in (features.class_token, features.encoder.pos_embedding,
                                      *features.conv_proj.parameters())}


def test_only_backbones_whose_forward_splits_between_stages_are_offered():
    assert supports_top_tuning(SPEC) and supports_top_tuning(get_backbone("resnet50"))
    assert supports_top_tuning(get_backbone("regnet_y_1_6gf")) and supports_top_tuning(get_backbone("timm/test_convnext"))
    assert not supports_top_tuning(get_backbone("mobilenet_v3_large"))
    assert not supports_top_tuning(get_backbone("convnext_tiny"))
    # a ViT's class token and position embedding are part of its bottom
    assert supports_top_tuning(get_backbone("vit_b_16")) and supports_top_tuning(get_backbone("vit_b_16_swag"))
    assert supports_top_tuning(get_backbone("timm/test_vit"))


def test_the_cache_holds_fp16_inputs_of_the_cut_and_its_pooled_features_are_the_probes(data, pretrained, acts):
    assert acts.acts.dtype == torch.float16 and acts.acts.shape[:2] == (len(data.train_y), 192)  # blocks.6 input
    assert not torch.equal(acts.acts, acts.acts_mirror)
    pooled, pooled_mirror = acts.pooled(pretrained)
    crops = normalize(eval_crop(data.train_x, PRE), PRE)
    with torch.no_grad():
        expected, expected_mirror = pretrained(crops), pretrained(crops.flip(-1))
    scale = expected.abs().max()
    assert (pooled - expected).abs().max() < 0.01 * scale
    assert (pooled_mirror - expected_mirror).abs().max() < 0.01 * scale


def test_caching_reports_progress_and_stops_when_asked(data, pretrained):
    recorder = Recorder()
    StageActivations.compute(pretrained, SPEC, data.train_x, PRE, 2, CPU, recorder)
    last = recorder.updates[-1]
    assert last == {"phase": "caching activations", "unit": "images", "done": len(data.train_y),
                    "total": len(data.train_y)}

    class Stop(Recorder):
        def stop_if_asked(self):
            raise InterruptedError

    with pytest.raises(InterruptedError):
        StageActivations.compute(pretrained, SPEC, data.train_x, PRE, 2, CPU, Stop())


# --- which weights train -----------------------------------------------------------------------

def test_only_the_last_k_stages_change_and_frozen_batchnorm_keeps_every_statistic(data, pretrained, acts):
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}
    tuned = backbone(fit(pretrained, acts, data, bn_mode="frozen"))
    assert all(torch.equal(before[k], v) for k, v in pretrained.state_dict().items()), "the input is untouched"
    assert all(torch.equal(before[k], v) for k, v in tuned.items() if not k.startswith(TRAINED))
    assert all(torch.equal(before[k], v) for k, v in tuned.items() if is_stat(k))
    assert any(not torch.equal(before[k], v) for k, v in tuned.items() if k.startswith("blocks.6.")
               and k.endswith("weight"))
    assert any(not torch.equal(before[k], v) for k, v in tuned.items() if k.startswith("conv_head."))


def test_bn_train_moves_statistics_of_the_trained_stages_only(data, pretrained, acts):
    before = pretrained.state_dict()
    tuned = backbone(fit(pretrained, acts, data, bn_mode="train", unfreeze_stages=1))
    changed = [k for k, v in tuned.items() if is_stat(k) and not torch.equal(before[k], v)]
    assert changed and all(k.startswith("bn2.") for k in changed), changed


def test_adabn_reestimates_the_trained_stages_statistics_then_keeps_them(data, pretrained, acts):
    before = pretrained.state_dict()
    one_epoch = backbone(fit(pretrained, acts, data, bn_mode="adabn", epochs=1))
    two = backbone(fit(pretrained, acts, data, bn_mode="adabn", epochs=2))
    means = [k for k in before if k.endswith("running_mean")]
    assert all(torch.equal(before[k], two[k]) for k in means if not k.startswith(TRAINED))
    assert all(not torch.equal(before[k], two[k]) for k in means if k.startswith(TRAINED))
    assert all(torch.equal(one_epoch[k], two[k]) for k in means), "adapted before training, then frozen"


def test_l2sp_leaves_the_trained_stages_nearer_their_pretrained_weights(data, pretrained, acts):
    before = pretrained.state_dict()

    def distance(state):
        return sum(((state[k] - before[k]) ** 2).sum() for k in state if k.startswith(TRAINED) and not is_stat(k))
    free = distance(backbone(fit(pretrained, acts, data, learning_rate=1e-2, weight_decay=0.0)))
    pulled = distance(backbone(fit(pretrained, acts, data, learning_rate=1e-2, weight_decay=0.0, l2sp=10.0)))
    assert pulled < free


# --- training ------------------------------------------------------------------------------------

def test_fit_learns_the_training_images(data, pretrained, acts):
    idx = torch.arange(len(data.train_y))
    classifier, history, seen = train_top(config(epochs=8, learning_rate=3e-3), pretrained, SPEC, acts, idx,
                                          data.train_y, 2, Recorder(), CPU)
    accuracy = (top_logits(classifier, SPEC, 2, acts, idx).argmax(1) == data.train_y).float().mean()
    assert accuracy >= 0.9 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert seen == 8 * len(idx), "each image once per epoch, as itself or its mirror"


def test_the_same_seed_gives_the_same_model_and_leaves_torchs_rng_alone(data, pretrained, acts):
    rng = torch.get_rng_state()
    a = fit(pretrained, acts, data, epochs=1).state_dict()
    assert torch.equal(rng, torch.get_rng_state())
    b = fit(pretrained, acts, data, epochs=1).state_dict()
    c = fit(pretrained, acts, data, epochs=1, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_an_explicit_job_serves_what_it_was_scored_on(data, tmp_path):
    recorder = Recorder()
    result = train(config(tta_flip=True), data, SPEC.build_features(pretrained=True), SPEC.feature_dim, recorder, CPU)
    both = len(data.train_y) + len(data.val_y)  # train and val: one phase
    assert {"phase": "caching activations", "unit": "images", "done": both, "total": both} in recorder.updates
    assert result.recipe["strategy"] == "fine_tune_top" and len(result.history) >= 1
    assert result.metrics["num_train_images"] == len(data.train_y)
    _, digest, _ = write_artifact(tmp_path, "m", result.classifier,
                                  {"backbone": SPEC.name, "classes": data.classes, "preprocessing": PRE.to_dict()})
    loaded = load_artifact(tmp_path / "m", digest)
    assert loaded.manifest["backbone_weights"]["source"] == "artifact", "its backbone is not the pretrained one"
    served = loaded.classifier.predict_proba(normalize(eval_crop(data.val_x, PRE), PRE))
    acts = StageActivations.compute(SPEC.build_features(pretrained=True), SPEC, data.val_x, PRE, 2, CPU, Recorder())
    cached = torch.softmax(top_logits(result.classifier, SPEC, 2, acts, torch.arange(len(data.val_y)))
                           / result.classifier.temperature, dim=1)
    assert (served - cached).abs().max() < 0.01
    assert torch.equal(served.argmax(1), cached.argmax(1))


# --- the recipe ------------------------------------------------------------------------------------

def test_fine_tune_top_defaults_are_the_measured_recipe():
    c = TrainConfig(strategy="fine_tune_top")
    assert (c.unfreeze_stages, c.learning_rate, c.weight_decay, c.label_smoothing, c.batch_size, c.schedule,
            c.augmentation) == (2, 1e-3, 0.05, 0.1, 64, "one_cycle", "light")
    assert TrainConfig(strategy="fine_tune_top", batch_size=32, schedule="cosine").batch_size == 32
    assert TrainConfig.model_validate(c.model_dump()) == c
    assert TrainConfig(strategy="partial").batch_size == 32 and TrainConfig(strategy="partial").label_smoothing == 0


@pytest.mark.parametrize("bad, says", [
    ({"cutmix_alpha": 1.0}, "cutmix mixes pixels"),
    ({"augmentation": "strong"}, "'strong' needs strategy 'partial'"),
    ({"backbone": "mobilenet_v3_large"}, "splits between stages"),
    ({"backbone": "convnext_tiny"}, "use strategy 'partial'"),
])
def test_recipes_that_need_pixels_or_an_unsplittable_backbone_are_refused(bad, says):
    with pytest.raises(ValidationError, match=says):
        TrainConfig(strategy="fine_tune_top", **bad)
