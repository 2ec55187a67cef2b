"""Semi-supervised self-training (issue 16) on constructed features: pseudo-labels obey their
class's threshold and the class balance, a scored image never helps train the head that scores it,
and unlabeled images are never scored."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.support.training import Recorder, one_thread, tiny_data  # noqa: F401
from workers.config import TrainConfig
from workers.training import selection, semi, train

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n_per_class: int, classes: int = 3, dim: int = 8, spread: float = 1.0, seed: int = 0):
    """Gaussian clusters, one per class: features and labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x.double(), y


def test_pseudo_labels_obey_each_class_threshold_and_the_balance():
    gen = torch.Generator().manual_seed(1)
    # Class 0 is easy (many confident images), class 1 hard, class 2 in between.
    logits = torch.cat([torch.randn(300, 3, generator=gen) + torch.tensor([6.0, 0, 0]),
                        torch.randn(20, 3, generator=gen) + torch.tensor([0, 1.5, 0]),
                        torch.randn(60, 3, generator=gen) + torch.tensor([0, 0, 3.0])])
    probs = torch.softmax(logits, 1)
    for share in semi.SHARES:
        chosen = semi.select_pseudo_labels(probs, share)
        conf, pred = probs.max(1)
        assert torch.equal(chosen.labels, pred[chosen.index])
        # every pseudo-label reaches its class's threshold, and the floor
        assert bool((conf[chosen.index].double() >= chosen.thresholds[chosen.labels]).all())
        assert bool((conf[chosen.index] >= semi.MIN_CONFIDENCE).all())
        # the threshold is the share's quantile of the class's own predictions (or the floor)
        for c in range(3):
            mine = conf[pred == c].double()
            if len(mine):
                assert float(chosen.thresholds[c]) == pytest.approx(
                    max(semi.MIN_CONFIDENCE, float(torch.quantile(mine, 1 - share))))
        counts = torch.bincount(chosen.labels, minlength=3).float()
        if counts.sum():
            assert counts.max() <= semi.BALANCE * max(1.0, float(counts[counts > 0].median())) + 1
            # the easy class does not swamp the rest: capped, keeping its most confident images
            kept0 = conf[chosen.index[chosen.labels == 0]]
            above = (pred == 0) & (conf.double() >= chosen.thresholds[0])
            capped = above & ~torch.isin(torch.arange(len(probs)), chosen.index)
            if len(kept0) and capped.any():
                assert float(kept0.min()) >= float(conf[capped].max())


def test_no_image_above_its_threshold_is_missed_unless_balance_caps_its_class():
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.1, 0.9], [0.3, 0.7], [0.02, 0.98]])
    chosen = semi.select_pseudo_labels(probs, share=1.0, floor=0.8, balance=10)
    assert chosen.index.tolist() == [0, 1, 2, 4]  # 0.7 is under the floor
    assert chosen.labels.tolist() == [0, 0, 1, 1]


def test_a_scored_image_never_trains_the_head_that_scores_it():
    """Changing the labels (and the features) of one fold's images leaves that fold's out-of-fold
    logits as they were: those images took no part in its training, calibration or thresholds."""
    x, y = blobs(12)
    pool, _ = blobs(40, seed=5)
    folds = selection.stratified_folds(y, 3, seed=0)
    before = semi.out_of_fold(x, None, y, folds, pool, None, 3, 1.0, tta=False)
    shuffled = y.clone()
    out = folds == 0
    shuffled[out] = (y[out] + 1) % 3  # wrong labels on fold 0's images
    after = semi.out_of_fold(x, None, shuffled, folds, pool, None, 3, 1.0, tta=False, scored_folds=[0])
    assert torch.allclose(before[out], after[out])
    # ...and the other folds, which trained on the changed labels, do change
    again = semi.out_of_fold(x, None, shuffled, folds, pool, None, 3, 1.0, tta=False, scored_folds=[1])
    assert not torch.allclose(before[folds == 1], again[folds == 1])


def test_self_training_uses_the_pool_and_reports_what_each_class_got():
    x, y = blobs(3, spread=0.8)  # three labeled images per class
    pool, pool_y = blobs(50, spread=0.8, seed=0)
    trained = semi.self_train(x, None, y, pool, None, 3, 1.0)
    assert trained.last is not None and len(trained.last.index) > 0
    assert len(trained.rounds) == semi.ROUNDS
    # the pseudo-labels are mostly right on well-separated clusters
    assert float((trained.last.labels == pool_y[trained.last.index]).float().mean()) > 0.9
    report = semi.summary(trained, ["a", "b", "c"], len(pool))
    assert report["used"] and sum(report["pseudo_labels"].values()) == report["pseudo_labeled"] == len(trained.last.index)
    assert set(report["pseudo_labels"]) == {"a", "b", "c"}


def _with_pool(data, n: int):
    """The same labeled images, and n other photos (val photos tiny_data left out) as unlabeled."""
    from tests.support.data import hymenoptera_files
    from workers.preprocessing import decode_square

    files = [p for label in ("ants", "bees") for p in hymenoptera_files("val", label)[3:3 + n // 2]]
    pool = torch.stack([decode_square(p.read_bytes(), data.preprocessing) for p in files])
    return dataclasses.replace(data, unlabeled_x=pool, unlabeled_ids=[f"u{i}" for i in range(len(pool))])


@pytest.fixture(scope="module")
def features():
    from tests.support.training import SPEC
    return SPEC.build_features(pretrained=True)


def test_unlabeled_images_are_never_scored_and_ignore_changes_nothing(features, monkeypatch):
    from tests.support.training import SPEC
    from workers.training import auto

    monkeypatch.setattr(auto, "plan_top", lambda *args: None)  # heads only: seconds
    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    data = dataclasses.replace(tiny_data(6, 3), val_given=False)
    pooled = _with_pool(data, 8)
    base = TrainConfig(strategy="auto", backbone="efficientnet_lite0", image_size=64, time_budget_s=10)
    plain = train(base, data, features, SPEC.feature_dim, Recorder(), CPU)
    ignored = train(base.model_copy(update={"unlabeled": "ignore"}), pooled, features, SPEC.feature_dim, Recorder(), CPU)
    assert ignored.metrics["estimate"] == plain.metrics["estimate"]
    assert ignored.metrics["val_accuracy"] == plain.metrics["val_accuracy"]
    assert "semi_supervised" not in ignored.metrics
    forced = train(base.model_copy(update={"unlabeled": "pseudo_label"}), pooled, features, SPEC.feature_dim,
                   Recorder(), CPU)
    labeled = len(data.train_y) + len(data.val_y)
    report = forced.metrics["semi_supervised"]
    assert report["used"] and report["unlabeled_images"] == len(pooled.unlabeled_x)
    assert set(report["pseudo_labels"]) == {"ants", "bees"}
    # the estimate, the held-out predictions and the per-class metrics count labeled images only
    assert forced.metrics["estimate"]["images"] == labeled
    assert len(forced.held_out.rows) == labeled and int(forced.held_out.rows.max()) < labeled
    assert sum(sum(row) for row in forced.metrics["confusion_matrix"]["matrix"]) == labeled
    assert any(c.get("unlabeled") == "pseudo_label" for c in forced.metrics["auto"]["candidates"])
    # left to auto: one more cross-validated candidate, and the report says whether it won
    chosen = train(base, pooled, features, SPEC.feature_dim, Recorder(), CPU)
    report = chosen.metrics["semi_supervised"]
    assert isinstance(report["used"], bool) and report["unlabeled_images"] == len(pooled.unlabeled_x)
    assert set(report["out_of_fold_accuracy"]) == {"supervised", "self_trained"}
    assert chosen.metrics["estimate"]["images"] == labeled


def test_with_a_val_split_you_gave_self_training_is_chosen_on_val_and_never_sees_it(features, monkeypatch):
    from tests.support.training import SPEC
    from workers.training import auto

    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    data = _with_pool(tiny_data(6, 3), 8)  # val_given: the user's split
    base = TrainConfig(strategy="auto", backbone="efficientnet_lite0", image_size=64, time_budget_s=10)
    chosen = train(base, data, features, SPEC.feature_dim, Recorder(), CPU).metrics
    assert set(chosen["semi_supervised"]["val_accuracy"]) == {"supervised", "self_trained"}
    forced = train(base.model_copy(update={"unlabeled": "pseudo_label"}), data, features, SPEC.feature_dim,
                   Recorder(), CPU)
    assert forced.metrics["semi_supervised"]["used"]
    assert forced.metrics["trained_on"] == {"images": len(data.train_y), "splits": ["train"]}
    assert forced.held_out.predictions == "val" and len(forced.held_out.rows) == len(data.val_y)
    assert forced.metrics["estimate"]["images"] == len(data.val_y)
