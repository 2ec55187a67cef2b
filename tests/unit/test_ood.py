"""Fitting "none of these" (workers/ood.py) on held-out predictions: which rows count, and the
threshold's pass rate."""
from __future__ import annotations

import pytest
import torch

from workers.ood import (NEGATIVE_LABEL, OutOfDistribution, check_min_score, cosine_parameters, cosine_score, fit_ood,
                        held_out_feature_scores, pass_threshold)
from workers.training.contract import HeldOut


def test_the_threshold_lets_95_percent_of_the_held_out_scores_pass():
    scores = torch.randperm(40).double()
    threshold = pass_threshold(scores)
    assert int((scores >= threshold).sum()) == 38 and int((scores >= threshold + 1).sum()) == 37


def test_energy_from_held_out_logits_when_there_are_no_features():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 3, generator=gen) * 4
    held = HeldOut(logits, logits.argmax(1), torch.arange(100, 160), "val")
    ood = fit_ood(held, ["a", "b", "c"], temperature=2.0)
    assert ood.kind == "energy" and ood.details["fitted_on"] == "val predictions"
    energy = 2.0 * torch.logsumexp(logits / 2.0, dim=1)
    assert ood.threshold == pytest.approx(pass_threshold(energy))
    assert torch.allclose(ood.score(logits, 2.0), energy)


def test_negative_examples_take_no_part_in_the_threshold_or_the_class_means():
    gen = torch.Generator().manual_seed(1)
    centers = torch.eye(8)[:3] * 6
    y = torch.arange(90) % 3  # class 2 is the negative class
    feats = centers[y] + torch.randn(90, 8, generator=gen)
    classes = ["ants", "bees", NEGATIVE_LABEL]
    logits = torch.randn(90, 3, generator=gen)
    with_negatives = fit_ood(HeldOut(logits, y, torch.arange(90), "out of fold"), classes, 1.0, feats, y)
    users = y != 2
    without = fit_ood(HeldOut(logits[users], y[users], torch.arange(90)[users], "out of fold"), classes, 1.0, feats, y)
    assert with_negatives.kind == "cosine" and with_negatives.details["images"] == 60
    assert with_negatives.threshold == pytest.approx(without.threshold)
    assert with_negatives.means.shape == (2, 8)  # one direction per user class
    # An image like the negative examples scores low: they never shaped the statistics.
    like_negative = centers[2:] + 0.1
    assert float(with_negatives.score(None, 1.0, like_negative)) < with_negatives.threshold


def test_out_of_fold_scores_never_see_the_image_they_score():
    """A lone image far from its class scores as an outsider out of fold; against class means that
    include it, it would look less strange."""
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(10) % 2
    feats = torch.eye(6)[y] * 5 + 0.3 * torch.randn(10, 6, generator=gen)
    feats[0] = torch.eye(6)[5] * 8  # class 0, but unlike the rest of it
    rows = torch.arange(10)
    out_of_fold = held_out_feature_scores("cosine", feats, y, [0, 1], rows, None)
    in_sample = cosine_score(feats, cosine_parameters(feats, y, [0, 1]))
    assert out_of_fold[0] < in_sample[0] - 0.05
    ood = fit_ood(HeldOut(torch.zeros(10, 2), y, rows, "out of fold"), ["a", "b"], 1.0, feats, y)
    assert ood.threshold == pytest.approx(pass_threshold(out_of_fold), abs=1e-6)
    assert ood.details["fitted_on"] == "out of fold predictions"


def test_min_score_is_checked_against_the_score_kind():
    ood = OutOfDistribution("cosine", 0.4, ["a", "b"], {"center": torch.zeros(4), "means": torch.eye(4)[:2]})
    assert check_min_score(ood, None, "m") is None and check_min_score(ood, 0.9, "m") is None
    assert "-1.0 to 1.0" in check_min_score(ood, 3.0, "m")
    assert "finite" in check_min_score(ood, float("nan"), "m")
    assert "no out-of-distribution score" in check_min_score(None, 0.5, "m")
    energy = OutOfDistribution("energy", 3.0, ["a", "b"])
    assert check_min_score(energy, -250.0, "m") is None
