"""Multi-label training (issue 17) on real photo mosaics at 64 px: per-label thresholds and
calibration come only from held-out predictions, the metrics are the standard ones, and every
strategy trains a sigmoid head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from tests.support.multilabel import draw_mosaics
from tests.support.training import PRE, SPEC, Recorder, one_thread  # noqa: F401
from workers.artifacts import multi_label_probabilities
from workers.config import TrainConfig
from workers.data import rarest_labels
from workers.metrics import multilabel_metrics
from workers.preprocessing import decode_square
from workers.training import PreparedData, train
from workers.training import selection
from workers.training.logistic import training_set
from workers.training.multilabel import OvrPath, served_logits, tune_thresholds
from workers.training.probe import FeatureCache

CLASSES = {"ants": ("hymenoptera", "ants"), "bees": ("hymenoptera", "bees"), "cells": ("bloodcells", "eosinophil")}


def mosaic_data(n_train: int = 30, n_val: int = 12, val_given: bool = False) -> PreparedData:
    labels = sorted(CLASSES)

    def load(split, n, seed):
        xs, ys = [], []
        for data, names in draw_mosaics(CLASSES, split, n, seed, sizes=(1, 2), side=96):
            xs.append(decode_square(data, PRE))
            ys.append([1.0 if c in names else 0.0 for c in labels])
        return torch.stack(xs), torch.tensor(ys)
    (tx, ty), (vx, vy) = load("train", n_train, 1), load("val", n_val, 2)
    return PreparedData(labels, PRE, tx, ty, vx, vy, val_given=val_given, multi_label=True)


@pytest.fixture(scope="module")
def data():
    return mosaic_data()


def test_thresholds_best_f1_or_a_requested_precision():
    probs = torch.tensor([[0.9], [0.8], [0.4], [0.3], [0.1]])
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0]])
    # F1 at 0.9, 0.8, 0.4, 0.3, 0.1: .667, .5, .8, .667, .571 -> 0.4, halfway down to 0.3
    assert tune_thresholds(probs, y)[0] == pytest.approx([0.35])
    assert tune_thresholds(probs, y, target_precision=0.95)[0] == pytest.approx([0.85])  # only 0.9 is precise enough
    assert tune_thresholds(probs, y, target_precision=0.6)[0] == pytest.approx([0.35])  # 0.4 has 2/3: more recall
    thresholds, how = tune_thresholds(torch.tensor([[0.7], [0.2]]), torch.tensor([[0.0], [0.0]]))
    assert thresholds == [0.5] and how[0]["tuned"] is False


def test_metrics_match_scikit_learn_on_random_scores():
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(60, 4, generator=gen) < 0.3).float()
    probs = (y * 0.3 + torch.rand(60, 4, generator=gen) * 0.7).clamp(0, 1)
    m = multilabel_metrics(y, probs, [0.5] * 4, list("abcd"))
    for i, c in enumerate("abcd"):
        assert m["per_label"][c]["ap"] == pytest.approx(average_precision_score(y[:, i], probs[:, i]), abs=1e-6)
    assert m["map_macro"] == pytest.approx(average_precision_score(y, probs, average="macro"), abs=1e-6)
    assert m["map_micro"] == pytest.approx(average_precision_score(y, probs, average="micro"), abs=1e-6)
    predicted = (probs >= 0.5).numpy()
    assert m["subset_accuracy"] == pytest.approx(float((predicted == y.numpy().astype(bool)).all(1).mean()), abs=1e-6)
    assert m["hamming_loss"] == pytest.approx(float((predicted != y.numpy().astype(bool)).mean()), abs=1e-6)
    assert len(m["pr_curves"]["a"]["precision"]) <= 50


def test_auto_tunes_thresholds_and_calibration_on_out_of_fold_predictions_only(data, one_thread):
    result = train(TrainConfig(strategy="auto", backbone="efficientnet_lite0", image_size=64), data,
                   SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder())
    c, held, m = result.classifier, result.held_out, result.metrics
    assert c.multi_label and m["task"] == "multi_label" and held.predictions == "out of fold"
    pooled_y = torch.cat([data.train_y, data.val_y])
    assert torch.equal(held.rows, torch.arange(len(pooled_y))) and torch.equal(held.y, pooled_y)
    # The thresholds and calibration are exactly those of the held-out logits ...
    probs = multi_label_probabilities(held.logits, c.label_scale, c.label_bias)
    assert c.thresholds == pytest.approx(tune_thresholds(probs, held.y)[0])
    assert m["thresholds"] == pytest.approx(dict(zip(data.classes, c.thresholds)), abs=1e-6)
    # ... and those logits are out of fold: fold 0's are what a fit that never saw fold 0 predicts.
    chosen = TrainConfig.model_validate(result.recipe)
    strata = torch.tensor(rarest_labels(pooled_y))
    k = m["auto"]["folds"]
    folds = selection.stratified_folds(strata, k, 0)
    features = SPEC.build_features(pretrained=True)
    cache = FeatureCache(features, data, torch.device("cpu"), Recorder(), mirrors=("train", "val"))
    x, xm = torch.cat([cache.train, cache.val]), torch.cat([cache.mirror("train"), cache.mirror("val")])
    fit_rows, out_rows = torch.nonzero(folds != 0).flatten(), torch.nonzero(folds == 0).flatten()
    fx, fy = training_set(x[fit_rows], pooled_y[fit_rows], xm[fit_rows])
    expected = served_logits(OvrPath(fx, fy).fit(chosen.logistic_c), x[out_rows], xm[out_rows])
    assert torch.allclose(held.logits[out_rows], expected, atol=2e-2), (held.logits[out_rows] - expected).abs().max()
    # The refitted model, scored on the very images it trained on, is far more confident there.
    in_sample = served_logits(OvrPath(*training_set(x, pooled_y, xm)).fit(chosen.logistic_c), x, xm)
    assert in_sample.abs().mean() > held.logits.abs().mean()
    assert m["map_macro"] > 0.8, m["per_label"]


def test_an_explicit_probe_tunes_on_the_val_split(one_thread):
    data = mosaic_data(24, 12, val_given=True)
    config = TrainConfig(strategy="linear_probe", solver="lbfgs", image_size=64, target_precision=0.9)
    result = train(config, data, SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder())
    c, held = result.classifier, result.held_out
    assert held.predictions == "val" and torch.equal(held.y, data.val_y)
    probs = multi_label_probabilities(held.logits, c.label_scale, c.label_bias)
    assert c.thresholds == pytest.approx(tune_thresholds(probs, data.val_y, 0.9)[0])
    assert result.metrics["threshold_tuning"]["target_precision"] == 0.9
    # Calibration is per label and monotone: it changes no label's ranking, so no AP.
    raw = multilabel_metrics(data.val_y, torch.sigmoid(held.logits), [0.5] * 3, data.classes)
    assert result.metrics["map_macro"] == pytest.approx(raw["map_macro"], abs=1e-6)
    assert all(s > 0 for s in c.label_scale)


@pytest.mark.parametrize("overrides", [
    {"strategy": "linear_probe", "epochs": 3},  # Adam on cached features, BCE
    {"strategy": "partial", "unfreeze_stages": 1, "epochs": 2, "augmentation": "none"},
])
def test_gradient_strategies_train_a_sigmoid_head_with_bce(overrides, one_thread):
    data = mosaic_data(18, 9, val_given=True)
    result = train(TrainConfig(image_size=64, batch_size=16, **overrides), data, SPEC.build_features(pretrained=True),
                   SPEC.feature_dim, Recorder())
    assert result.classifier.multi_label and len(result.classifier.thresholds) == 3
    assert all("val_map" in h for h in result.history)
    x = torch.randn(2, 3, 64, 64)
    probs = result.classifier.predict_proba(x)
    assert probs.shape == (2, 3) and not np.allclose(probs.sum(1).numpy(), 1.0)  # sigmoids, not a softmax
