"""Each recipe option has the effect it promises, on a dozen real photos at 64 px."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from tests.support.training import PRE, SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.training import auto, logistic
from workers.artifacts import Classifier, load_artifact, write_artifact
from workers.calibration import expected_calibration_error, fit_temperature, nll
from workers.config import TrainConfig
from workers.metrics import classification_metrics
from workers.preprocessing import BatchAugment, batch_mixer, eval_crop, mix_batch, normalize
from workers.training import PreparedData, train
from workers.training.finetune import stage_param_groups, unfreeze_plan
from workers.training.parts import (EarlyStopping, adapt_batchnorm, class_weights, l2sp_penalty, make_criterion,
                                    make_scheduler, train_batches)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return tiny_data()


@pytest.fixture(scope="module")
def pretrained() -> dict[str, torch.Tensor]:
    return SPEC.build_features(pretrained=True).state_dict()


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 4, "image_size": 64, "seed": 7, **overrides})


def run(data, recorder=None, features=None, **overrides):
    features = features if features is not None else SPEC.build_features(pretrained=True)
    return train(config(**overrides), data, features, SPEC.feature_dim, recorder or Recorder(), CPU)


def backbone_state(result) -> dict[str, torch.Tensor]:
    return {k.removeprefix("features."): v for k, v in result.classifier.state_dict().items()
            if k.startswith("features.")}


def stats_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


# --- BatchNorm policy ------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["linear_probe", "fine_tune", "partial", "gradual"])
def test_bn_frozen_leaves_every_running_statistic_unchanged(strategy, data, pretrained):
    tuned = backbone_state(run(data, strategy=strategy, bn_mode="frozen"))
    keys = stats_keys(pretrained)
    assert keys and all(torch.equal(pretrained[k], tuned[k]) for k in keys)


def test_bn_train_updates_statistics_of_trained_stages_only(data, pretrained):
    features = SPEC.build_features(pretrained=True)
    stages = SPEC.stages(features)
    frozen_names = {n for n, _ in stages[0].named_parameters(prefix="")}  # the stem: never trained here
    tuned = backbone_state(run(data, features=features, strategy="partial", unfreeze_stages=2, bn_mode="train"))
    changed = [k for k in stats_keys(pretrained) if not torch.equal(pretrained[k], tuned[k])]
    assert any(k.startswith("conv_head") or k.startswith("bn2") for k in changed), "trained stages' stats move"
    assert all(k.startswith(("blocks.6", "bn2")) for k in changed), changed
    assert frozen_names and all(not k.startswith(("conv_stem", "bn1.")) for k in changed)


@pytest.mark.parametrize("strategy", ["linear_probe", "fine_tune"])
def test_adabn_reestimates_statistics_before_training_and_keeps_them(strategy, data, pretrained):
    adapted = SPEC.build_features(pretrained=True)
    adapt_batchnorm(adapted, data.train_x, PRE, CPU, Recorder())
    expected = adapted.state_dict()
    tuned = backbone_state(run(data, strategy=strategy, bn_mode="adabn"))
    keys = stats_keys(pretrained)
    assert all(torch.equal(expected[k], tuned[k]) for k in keys), "frozen after adaptation"
    assert all(not torch.equal(pretrained[k], tuned[k]) for k in keys if k.endswith("running_mean"))


# --- which weights train -----------------------------------------------------------------------

def test_partial_frozen_stages_get_no_gradient_and_stay_bit_identical(data, pretrained):
    features = SPEC.build_features(pretrained=True)
    result = run(data, features=features, strategy="partial", unfreeze_stages=2)
    stages = SPEC.stages(features)
    frozen = [p for s in stages[:-2] for p in s.parameters()]
    assert frozen and all(p.grad is None for p in frozen)
    tuned = backbone_state(result)
    prefix_trained = ("blocks.6.", "conv_head.", "bn2.")
    assert all(torch.equal(pretrained[k], v) for k, v in tuned.items() if not k.startswith(prefix_trained))
    assert any(not torch.equal(pretrained[k], v) for k, v in tuned.items()
               if k.startswith(prefix_trained) and k.endswith("weight"))


def test_gradual_trains_the_head_alone_first_then_one_more_stage_per_epoch(data, pretrained):
    cfg = config(strategy="gradual")
    assert [unfreeze_plan(cfg, 9)(e) for e in range(1, 12)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]
    assert [unfreeze_plan(config(strategy="gradual", unfreeze_stages=2), 9)(e) for e in (1, 2, 3, 4)] == [0, 1, 2, 2]
    recorder = Recorder()
    tuned = backbone_state(run(data, recorder, strategy="gradual", epochs=2))
    assert [u["trainable_stages"] for u in recorder.updates if "val_accuracy" in u] == [0, 1]
    last = ("conv_head.", "bn2.")  # the last stage: the only one trained, in epoch 2
    assert all(torch.equal(pretrained[k], v) for k, v in tuned.items() if not k.startswith(last))


def test_discriminative_rates_shrink_by_the_factor_per_stage_toward_the_input():
    features = SPEC.build_features(pretrained=False)
    classifier = Classifier(features, SPEC.feature_dim, 2)
    stages = SPEC.stages(features)
    groups, params = stage_param_groups(classifier, stages, 3, config(strategy="fine_tune", learning_rate=1e-3,
                                                                      lr_stage_factor=0.5))
    assert sorted({g["lr"] for g in groups}, reverse=True) == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4])
    assert len(params) == sum(1 for s in stages[-3:] for _ in s.parameters())


# --- regularization ------------------------------------------------------------------------------

def test_l2sp_penalty_is_zero_at_the_pretrained_weights_and_grows_with_distance():
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    reference = [p.detach().clone() for p in params]
    assert float(l2sp_penalty(params, reference).detach()) == 0.0
    penalties = []
    for step in (0.1, 0.2, 0.4):
        moved = [nn.Parameter(r + step) for r in reference]
        penalties.append(float(l2sp_penalty(moved, reference).detach()))
    assert penalties[0] > 0 and penalties[1] == pytest.approx(4 * penalties[0]) and penalties[2] > penalties[1]


def test_l2sp_keeps_fine_tuned_weights_closer_to_pretrained(data, pretrained):
    def distance(**kw):
        tuned = backbone_state(run(data, strategy="fine_tune", learning_rate=1e-2, weight_decay=0.0, **kw))
        return sum(float(((tuned[k] - pretrained[k]) ** 2).sum()) for k in pretrained if k.endswith("weight"))
    assert distance(l2sp=5.0) < distance()


def test_label_smoothing_and_class_weighting_change_the_loss():
    logits, y = torch.tensor([[4.0, -4.0], [4.0, -4.0], [-4.0, 4.0]]), torch.tensor([0, 0, 1])
    plain = make_criterion(config(strategy="linear_probe"), y, 2, CPU)(logits, y)
    smooth = make_criterion(config(strategy="linear_probe", label_smoothing=0.2), y, 2, CPU)(logits, y)
    assert smooth > plain  # confident correct logits now cost something
    assert class_weights(torch.tensor([0, 0, 0, 1]), 2).tolist() == pytest.approx([2 / 3, 2.0])


def test_balanced_sampler_draws_each_class_about_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([labels[i] for _ in range(20) for i in train_batches(labels, 32, "balanced", gen)])
    assert 0.4 < float(drawn.float().mean()) < 0.6
    shuffled = torch.cat([labels[i] for i in train_batches(labels, 32, "shuffle", gen)])
    assert float(shuffled.float().mean()) == pytest.approx(0.1)


def test_feature_l1_makes_the_hidden_layer_sparser(data):
    def mean_hidden(l1):
        result = run(data, strategy="linear_probe", head="mlp", hidden_dim=64, feature_l1=l1, epochs=20)
        with torch.no_grad():
            x = normalize(eval_crop(data.val_x, PRE), PRE)
            _, hidden = result.classifier.head_with_representation(result.classifier.features(x))
        return float(hidden.abs().mean())
    assert mean_hidden(1.0) < 0.5 * mean_hidden(0.0)


def test_dropout_is_active_in_training_only():
    classifier = Classifier(nn.Identity(), 16, 3, head="mlp", hidden_dim=8, dropout=0.5)
    x = torch.randn(4, 16)
    classifier.train()
    assert not torch.equal(classifier(x), classifier(x))
    classifier.eval()
    assert torch.equal(classifier(x), classifier(x))


# --- augmentation and mixing ---------------------------------------------------------------------

def test_mixup_produces_mixed_soft_targets():
    x = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    y = torch.tensor([0, 1, 2, 0])
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mixed, target = mix_batch(x, y, batch_mixer(1.0, 0.0, 3), 1.0, gen)
    assert target.shape == (4, 3) and torch.allclose(target.sum(1), torch.ones(4))
    assert ((target > 0).sum(1) >= 2).any(), "some rows mix two classes"
    lam = target[1, 1]  # row 1 = lam * x1 + (1 - lam) * x0 (torchvision rolls the batch by one)
    assert torch.allclose(mixed[1], lam * x[1] + (1 - lam) * x[0], atol=1e-5)
    feats, ft = mix_batch(torch.randn(4, 10), y, batch_mixer(1.0, 0.0, 3), 1.0, gen)
    assert feats.shape == (4, 10) and ft.shape == (4, 3)
    same, labels = mix_batch(x, y, batch_mixer(1.0, 0.0, 3), 0.0, gen)
    assert same is x and labels is y  # mix_prob 0: untouched


def test_augmentation_presets(data):
    batch = data.train_x[:4]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(BatchAugment("none", PRE)(batch, gen), normalize(eval_crop(batch, PRE), PRE))
    light = BatchAugment("light", PRE)
    a, b = light(batch, gen), light(batch, gen)
    assert a.shape == (4, 3, PRE.input_size, PRE.input_size) and a.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(a, b), "each call draws new crops"
    assert not torch.allclose(a[0], a[1]) or not torch.equal(batch[0], batch[1])
    # the same generator state gives the same batch: what a resumed checkpoint relies on
    assert torch.equal(light(batch, torch.Generator().manual_seed(7)), light(batch, torch.Generator().manual_seed(7)))
    strong = BatchAugment("strong", PRE)(batch, gen)
    low = (torch.tensor(0.0) - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(PRE.std).view(1, 3, 1, 1)
    assert strong.shape == a.shape and (strong >= low - 1e-4).all(), "pixels stay in range after jitter"
    grey = torch.full((64, 3, PRE.resize_size, PRE.resize_size), 200, dtype=torch.uint8)
    erased = ((BatchAugment("strong", PRE)(grey, gen) - low).abs() < 1e-5).flatten(1).any(1).sum()
    assert 4 <= erased <= 32, f"random erasing hits about a quarter of the images, not {erased}/64"


def test_batch_crop_of_the_whole_square_is_the_resized_square():
    """A crop covering the square, unflipped, equals a plain bilinear resize of it: the geometry is right."""
    side = PRE.resize_size
    square = torch.linspace(0, 1, side).view(1, 1, 1, side).expand(1, 3, side, side).contiguous()
    aug = BatchAugment("light", PRE)
    aug.SCALE, aug.RATIO = (1.0, 1.0), (1.0, 1.0)
    flipped = [aug._resized_crops(square, torch.Generator().manual_seed(s)) for s in range(6)]
    resized = torch.nn.functional.interpolate(square, size=(PRE.input_size,) * 2, mode="bilinear",
                                              align_corners=False)
    for out in flipped:
        assert torch.allclose(out, resized, atol=1e-5) or torch.allclose(out, resized.flip(-1), atol=1e-5)
    assert any(torch.allclose(o, resized.flip(-1), atol=1e-5) for o in flipped), "flips happen"


def test_tta_flip_makes_predictions_mirror_invariant():
    classifier = Classifier(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                          nn.Linear(4, 4)), 4, 2).eval()
    x = torch.randn(2, 3, 9, 9)
    assert not torch.allclose(classifier.predict_proba(x), classifier.predict_proba(x.flip(-1)))
    classifier.tta_flip = True
    assert torch.allclose(classifier.predict_proba(x), classifier.predict_proba(x.flip(-1)), atol=1e-6)


# --- schedules and early stopping ----------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "one_cycle"])
def test_schedules_warm_up_then_decay(schedule):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = make_scheduler(opt, config(strategy="fine_tune", schedule=schedule, warmup_fraction=0.2), 50)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert 5 <= peak <= 12 and max(lrs) == pytest.approx(0.1, rel=0.05) and lrs[-1] < 0.01
    assert lrs[:peak] == sorted(lrs[:peak]) and lrs[peak:] == sorted(lrs[peak:], reverse=True)


def test_early_stopping_stops_at_patience_and_keeps_the_best_epoch():
    module = nn.Linear(1, 1)
    stopper = EarlyStopping("val_loss", patience=2)
    losses = [1.0, 0.5, 0.6, 0.7, 0.4]
    stops = []
    for epoch, loss in enumerate(losses, start=1):
        with torch.no_grad():
            module.weight.fill_(epoch)
        stops.append(stopper.update({"epoch": epoch, "val_loss": loss, "val_accuracy": 0.5}, module))
    assert stops == [False, False, False, True, False]
    stopper.restore(module)
    assert stopper.best["epoch"] == 5 and float(module.weight.detach()) == 5.0


def test_training_stops_after_patience_epochs_without_improvement(data):
    result = run(data, strategy="linear_probe", epochs=200, patience=3, monitor="val_loss", learning_rate=0.05)
    m = result.metrics
    assert m["stopped_early"] and m["epochs_run"] == m["best_epoch"] + 3 < 200
    best = result.history[m["best_epoch"] - 1]
    assert best["val_loss"] == min(h["val_loss"] for h in result.history)
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(best)


# --- calibration and metrics ---------------------------------------------------------------------

def test_temperature_scaling_lowers_nll_on_the_set_it_was_fitted_on():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (200,), generator=gen)
    logits = torch.randn(200, 3, generator=gen) + 2.0 * nn.functional.one_hot(y, 3)
    overconfident = 5 * logits
    t = fit_temperature(overconfident, y)
    assert t > 1 and nll(overconfident, y, t) < nll(overconfident, y)
    probs = torch.softmax(overconfident, 1)
    assert expected_calibration_error(torch.softmax(overconfident / t, 1), y) < expected_calibration_error(probs, y)


def test_trained_model_reports_calibration_and_serves_calibrated_probabilities(data, tmp_path):
    result = run(data, strategy="linear_probe", head="mlp", tta_flip=True, epochs=30, learning_rate=1e-2)
    cal = result.metrics["calibration"]
    assert cal["nll_after"] <= cal["nll_before"] and cal["bins"] == 15
    assert result.classifier.temperature == pytest.approx(cal["temperature"], abs=1e-6)
    manifest = {"backbone": SPEC.name, "classes": ["ants", "bees"], "preprocessing": PRE.to_dict()}
    path, digest, _ = write_artifact(tmp_path, "m1", result.classifier, manifest)
    serving = json.loads((path / "manifest.json").read_text())["serving"]
    ood = serving.pop("ood")  # the "none of these" threshold, fitted on held-out predictions (issue 17)
    assert ood["fitted_on"] == "val predictions" and ood["images"] == len(data.val_y)
    assert serving == {"head": "mlp", "hidden_dim": 512, "dropout": 0.0, "tta_flip": True,
                       "temperature": result.classifier.temperature}
    loaded = load_artifact(path, digest)
    x = normalize(eval_crop(data.val_x, PRE), PRE)
    expected = result.classifier.predict_proba(x)
    assert torch.allclose(loaded.classifier.predict_proba(x), expected, atol=1e-5)
    acc = float((expected.argmax(1) == data.val_y).float().mean())
    assert acc == pytest.approx(result.metrics["val_accuracy"], abs=1e-6)


def test_metrics_cover_balanced_accuracy_macro_f1_top5_and_ece():
    y = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5])
    probs = nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]), 6).float() * 0.9 + 0.1 / 6
    m = classification_metrics(y, probs, list("abcdef"))
    assert m["val_accuracy"] == pytest.approx(7 / 8) and m["balanced_accuracy"] == pytest.approx((2 / 3 + 5) / 6)
    assert m["top5_accuracy"] == 1.0 and 0 < m["macro_f1"] < 1 and m["ece"] >= 0
    assert "top5_accuracy" not in classification_metrics(y.clamp(max=1), probs[:, :2].softmax(1), ["a", "b"])


# --- validation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"strategy": "linear_probe", "cutmix_alpha": 1.0}, "cutmix"),
    ({"strategy": "linear_probe", "bn_mode": "train"}, "bn_mode"),
    ({"strategy": "linear_probe", "l2sp": 0.1}, "l2sp"),
    ({"strategy": "linear_probe", "augmentation": "strong"}, "strong"),
    ({"strategy": "fine_tune", "time_budget_s": 60}, "time_budget_s"),
    ({"strategy": "fine_tune", "unfreeze_stages": 2}, "unfreeze_stages"),
    ({"head": "linear", "hidden_dim": 64}, "hidden_dim"),
    ({"mix_prob": 0.5}, "mix_prob"),
    ({"class_weighting": "balanced", "sampler": "balanced"}, "twice"),
    ({"dropout": 1.0}, "dropout"), ({"label_smoothing": 0.9}, "label_smoothing"),
    ({"bn_mode": "moving"}, "bn_mode"), ({"schedule": "step"}, "schedule"),
])
def test_bad_options_are_rejected_with_a_reason(fields, words):
    with pytest.raises(ValidationError) as err:
        TrainConfig(**fields)
    assert words in str(err.value)


def test_explicit_strategies_are_filled_in_and_auto_leaves_choices_open():
    assert TrainConfig().strategy == "auto" and TrainConfig().learning_rate is None
    partial = TrainConfig(strategy="partial")
    assert partial.unfreeze_stages == 2 and partial.head == "linear" and partial.tta_flip is False
    assert TrainConfig.model_validate(partial.model_dump()) == partial  # a stored job re-validates unchanged
    assert TrainConfig(strategy="fine_tune", mixup_alpha=0.2).mix_prob == 0.5


# --- auto -------------------------------------------------------------------------------------------

def test_auto_records_its_choice_and_the_choice_reproduces(data):
    """With the user's val split: every candidate trains on train and is scored on val; the model
    is the winner as trained on train, and the headline accuracy is the selection-corrected one."""
    recorder = Recorder()
    result = run(data, recorder, strategy="auto", epochs=None)  # default budget: no candidate is cut short
    chosen = result.recipe
    report = result.metrics["auto"]
    assert chosen["strategy"] != "auto" and report["chosen"] == chosen
    recipes = [c["recipe"] for c in report["candidates"]]
    assert [r.get("logistic_c") for r in recipes[:len(logistic.C_GRID)]] == list(logistic.C_GRID)
    assert {"backbone": "efficientnet_lite0", "strategy": "linear_probe", "head": "linear", "solver": "adamw",
            "learning_rate": 1e-3, "augmentation": "none", "tta_flip": False, "dropout": 0.0, "epochs": 60} in recipes
    best = max(report["candidates"], key=lambda c: (c["val_accuracy"], -c["val_loss"]))
    m = result.metrics
    assert m["selection_accuracy"] == best["val_accuracy"]
    assert m["val_accuracy"] == m["estimate"]["accuracy"] and m["estimate"]["predictions"] == "val"
    assert m["trained_on"] == {"images": len(data.train_y), "splits": ["train"]}
    assert any(u.get("auto_choice") for u in recorder.updates)
    again = train(TrainConfig.model_validate(chosen), data, SPEC.build_features(pretrained=True), SPEC.feature_dim,
                  Recorder(), CPU)
    assert again.metrics["val_accuracy"] == m["selection_accuracy"]
    assert again.metrics["val_loss"] == pytest.approx(m["val_loss"], abs=1e-5)


def test_auto_with_refit_trains_the_choice_on_train_and_val(data, monkeypatch):
    fitted_rows: list[int] = []
    real_path = logistic.LogisticPath.__init__

    def counting_path(self, x, y, *a, **kw):
        fitted_rows.append(len(y))
        real_path(self, x, y, *a, **kw)

    monkeypatch.setattr(logistic.LogisticPath, "__init__", counting_path)
    monkeypatch.setattr(auto, "FINE_TUNE_GRID", {"cpu": [], "cuda": []})  # heads only, to stay fast
    result = run(data, strategy="auto", solver="lbfgs", refit=True, epochs=None)
    labeled = len(data.train_y) + len(data.val_y)
    assert result.recipe["solver"] == "lbfgs" and result.recipe["refit"] is None  # an explicit recipe
    assert fitted_rows[-1] == 2 * labeled  # the refit: every image and its mirror
    assert result.metrics["trained_on"] == {"images": labeled, "splits": ["train", "val"]}


def test_auto_keeps_what_the_user_fixed_and_skips_what_contradicts_it(data):
    cfg = config(strategy="auto", head="mlp", cutmix_alpha=1.0, epochs=None)
    assert auto.candidate(cfg, {"strategy": "linear_probe", **auto.PROBE_GRID[0]}) is None  # no cutmix on a probe
    tuned = auto.candidate(cfg, {"strategy": "fine_tune", "head": "linear", "learning_rate": 5e-4})
    assert tuned.head == "mlp" and tuned.learning_rate == 5e-4 and tuned.cutmix_alpha == 1.0
    assert auto.plan_fine_tuning(cfg, data, "cpu", seconds_left=1e-3) == []  # no time, no fine-tuning
    assert [c.strategy for c in auto.plan_fine_tuning(cfg, data, "cpu", seconds_left=600)] == ["fine_tune"]
    assert {c.strategy for c in auto.plan_fine_tuning(cfg, data, "cuda", seconds_left=600)} == {"fine_tune", "partial"}


def test_auto_fine_tunes_when_the_user_asks_for_what_a_probe_cannot_do(data):
    result = run(data, strategy="auto", cutmix_alpha=1.0, epochs=2)
    assert result.recipe["strategy"] == "fine_tune" and result.recipe["cutmix_alpha"] == 1.0
    assert result.recipe["epochs"] == 2 and len(result.history) == 2


def test_contradictory_job_options_are_a_422_saying_what_is_allowed(settings):
    from fastapi.testclient import TestClient

    from service.app import create_app
    with TestClient(create_app(settings)) as client:
        resp = client.post("/v1/jobs", json={"dataset_id": "any", "strategy": "linear_probe", "cutmix_alpha": 1.0})
    assert resp.status_code == 422 and resp.headers["content-type"].startswith("application/problem+json")
    assert "cutmix" in resp.json()["detail"] and "mixup_alpha" in resp.json()["detail"]


def test_on_a_cpu_features_for_the_head_come_from_the_frozen_backbone(data):
    """A linear probe extracts its features with the traced, frozen backbone the API serves with
    (faster), and they are the eager backbone's features within the freeze's tolerance."""
    from workers.backbones import FROZEN_TOLERANCE
    from workers.training.probe import FeatureCache

    features = SPEC.build_features(pretrained=True).eval()
    cache = FeatureCache(features, data, CPU, Recorder())
    assert isinstance(cache.runner, torch.jit.ScriptModule)
    with torch.no_grad():
        eager = features(normalize(eval_crop(data.val_x, PRE), PRE))
    assert cache.val.shape == eager.shape
    assert (cache.val - eager).abs().max() <= FROZEN_TOLERANCE
    assert not cache.val.is_inference(), "the head trains on these: they must be ordinary tensors"


def test_a_later_job_on_the_same_images_and_weights_reuses_the_features(data):
    """Features on a CPU are kept for later jobs: the same pixels, split and backbone weights run no
    backbone pass; other weights, or data without a source key, compute their own."""
    import copy
    import dataclasses

    from workers.training.probe import REUSED_FEATURES, FeatureCache

    keyed = dataclasses.replace(data, source_key="hymenoptera-subset")
    features = SPEC.build_features(pretrained=True).eval()
    REUSED_FEATURES.clear()
    try:
        first = FeatureCache(features, keyed, CPU, Recorder())
        assert not first.reused and first.images == len(data.train_x) + len(data.val_x)
        mirror = first.mirror("train")
        again = FeatureCache(copy.deepcopy(features), keyed, CPU, Recorder())
        assert again.reused and again.images == 0
        assert torch.equal(again.train, first.train) and again.mirror("train") is mirror and again.images == 0

        changed = copy.deepcopy(features)
        with torch.no_grad():
            changed.conv_stem.weight.mul_(0.5)  # e.g. AdaBN-adapted or fine-tuned: other features
        other = FeatureCache(changed, keyed, CPU, Recorder())
        assert not other.reused and not torch.equal(other.train, first.train)
        assert not FeatureCache(features, data, CPU, Recorder()).reused  # no source key: nothing shared
    finally:
        REUSED_FEATURES.clear()


def test_a_later_job_on_other_images_reuses_the_frozen_backbone(data):
    """Freezing takes most of a second: a job on other images with the same weights uses the copy
    an earlier job made; other weights get their own."""
    import copy

    from workers.training.probe import FeatureCache

    features = SPEC.build_features(pretrained=True).eval()
    first = FeatureCache(features, data, CPU, Recorder()).runner
    half = PreparedData(data.classes, PRE, data.train_x[:4], data.train_y[:4], data.val_x[:2], data.val_y[:2])
    assert FeatureCache(copy.deepcopy(features), half, CPU, Recorder()).runner is first
    changed = copy.deepcopy(features)
    with torch.no_grad():
        changed.conv_stem.weight.mul_(0.5)
    assert FeatureCache(changed, half, CPU, Recorder()).runner is not first


def test_auto_plans_top_tuning_only_when_its_folds_and_refit_fit_the_budget():
    cfg = config(strategy="auto", epochs=None, image_size=224)
    top = auto.plan_top(cfg, images=400, folds=5, device_type="cpu", seconds_left=1e4)
    assert top is not None and top.strategy == "fine_tune_top" and top.unfreeze_stages == auto.TOP_STAGES
    needed = auto.top_seconds(top, 400, 5, "cpu")
    assert auto.plan_top(cfg, 400, 5, "cpu", needed - 1) is None  # the same job always makes the same choice
    assert auto.top_seconds(top, 400, 5, "cuda") < needed / 10 and auto.plan_top(cfg, 400, 5, "cuda", needed) is not None
    assert auto.plan_top(config(strategy="auto", cutmix_alpha=1.0), 400, 5, "cpu", 1e4) is None  # no pixels to cut
