"""Training functions on a handful of real photos: reproducible, BatchNorm statistics frozen."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.support.training import PRE, SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.config import TrainConfig
from workers.data import stratified_split
from workers.training import PreparedData, train
from workers.training.parts import param_groups



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return tiny_data()


def run(strategy: str, data: PreparedData, **overrides):
    config = TrainConfig(strategy=strategy, epochs=2, batch_size=4, image_size=64, seed=7, **overrides)
    features = SPEC.build_features(pretrained=True)
    return train(config, data, features, SPEC.feature_dim, Recorder(), torch.device("cpu"))


@pytest.mark.parametrize("strategy, options", [
    ("linear_probe", {}), ("linear_probe", {"head": "mlp", "dropout": 0.3, "mixup_alpha": 0.4, "augmentation": "light"}),
    ("fine_tune", {}), ("gradual", {"augmentation": "strong", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_prob": 1.0}),
    ("partial", {"bn_mode": "train", "sampler": "balanced", "schedule": "one_cycle"}),
])
def test_same_seed_same_model(strategy, options, data):
    a, b = run(strategy, data, **options), run(strategy, data, **options)
    timing = {"train_seconds", "train_images_per_s"}
    assert a.history == b.history
    assert {k: v for k, v in a.metrics.items() if k not in timing} == {k: v for k, v in b.metrics.items() if k not in timing}
    for (name, wa), wb in zip(a.classifier.state_dict().items(), b.classifier.state_dict().values()):
        assert torch.equal(wa, wb), name


def test_fine_tune_keeps_batchnorm_running_statistics(data):
    pretrained = SPEC.build_features(pretrained=True).state_dict()
    result = run("fine_tune", data, augmentation="strong")
    tuned = {k.removeprefix("features."): v for k, v in result.classifier.state_dict().items()
             if k.startswith("features.")}
    stats = [k for k in pretrained if "running_" in k]
    assert stats and all(torch.equal(pretrained[k], tuned[k]) for k in stats)
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained if k.endswith("weight")), \
        "fine-tuning must change backbone weights"


def test_linear_probe_leaves_backbone_untouched(data):
    result = run("linear_probe", data)
    pretrained = SPEC.build_features(pretrained=True).state_dict()
    assert all(torch.equal(v, pretrained[k.removeprefix("features.")])
               for k, v in result.classifier.state_dict().items() if k.startswith("features."))
    assert result.metrics["confusion_matrix"]["labels"] == ["ants", "bees"]
    assert result.metrics["best_epoch"] in (1, 2)


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and len(no_decay["params"]) == 4  # 2 biases + BN affine


def test_stratified_split_holds_out_each_class_and_is_seeded():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    split = stratified_split(labels, 0.2, seed=3)
    assert split == stratified_split(labels, 0.2, seed=3)
    for cls, n_val in ((0, 2), (1, 1), (2, 1)):
        assert [s for s, y in zip(split, labels) if y == cls].count("val") == n_val
