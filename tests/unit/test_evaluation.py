"""The held-out predictions a model keeps (workers/evaluation.py): auto's are out of fold over every
labeled image, an explicit recipe's its val predictions, a test split's what /predict answers."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.support.training import SPEC, Recorder, one_thread, tiny_data  # noqa: F401  (fixture)
from workers.artifacts import calibrated_probabilities
from workers.config import TrainConfig
from workers.evaluation import EVALUATION_FILE, LOGITS_FILE, held_out_summary, read_evaluation, read_logits
from workers.evaluation import evaluation_files
from workers.training import train


def with_ids(data, test: bool = False):
    """tiny_data with image ids (as workers.data gives them), and its val split as a test split."""
    ids = {s: [f"{s}{i:03d}" for i in range(n)] for s, n in (("train", len(data.train_y)), ("val", len(data.val_y)))}
    extra = {"test_x": data.val_x, "test_y": data.val_y, "test_ids": [f"test{i:03d}" for i in range(len(data.val_y))]} \
        if test else {}
    return dataclasses.replace(data, train_ids=ids["train"], val_ids=ids["val"], **extra)


def test_auto_keeps_its_out_of_fold_predictions_over_every_labeled_image(one_thread):
    data = dataclasses.replace(with_ids(tiny_data()), val_given=False)  # Graft's own split: cross-validated
    # one epoch for the top-of-network candidate: its five folds take seconds, not half a minute
    config = TrainConfig(strategy="auto", backbone=SPEC.name, image_size=64, time_budget_s=10, epochs=1)
    result = train(config, data, SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(),
                   torch.device("cpu"))
    files = evaluation_files(result, data)
    document = read_evaluation(files[EVALUATION_FILE])
    assert document["predictions"] == "out of fold" and held_out_summary(files)["images"] == 18
    assert sorted(r["image_id"] for r in document["rows"]) == sorted(data.train_ids + data.val_ids)
    truth = dict(zip(data.train_ids + data.val_ids, torch.cat([data.train_y, data.val_y]).tolist()))
    assert all(document["classes"][truth[r["image_id"]]] == r["true_label"] for r in document["rows"])
    logits, labels = read_logits(files[LOGITS_FILE])
    assert logits.shape == (18, 2) and labels.tolist() == [truth[r["image_id"]] for r in document["rows"]]
    # The rows are the logits calibrated with the model's temperature.
    probs = calibrated_probabilities(logits, result.classifier.temperature)
    assert [r["probability"] for r in document["rows"]] == pytest.approx(probs.max(1).values.tolist(), abs=1e-6)
    assert sum(not r["correct"] for r in document["rows"]) == round(18 * (1 - result.metrics["selection_accuracy"]))


def test_a_test_split_keeps_what_predict_answers(one_thread):
    data = with_ids(tiny_data(), test=True)
    config = TrainConfig(strategy="linear_probe", backbone=SPEC.name, image_size=64, epochs=3)
    result = train(config, data, SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(),
                   torch.device("cpu"))
    document = json.loads(evaluation_files(result, data)[EVALUATION_FILE])
    validation = [r for r in document["rows"] if r["subset"] == "validation"]
    test = [r for r in document["rows"] if r["subset"] == "test"]
    assert document["predictions"] == "val" and [r["image_id"] for r in validation] == data.val_ids
    assert [r["image_id"] for r in test] == data.test_ids and {r["split"] for r in test} == {"test"}
    assert [r["probability"] for r in test] == pytest.approx(result.test_probabilities.max(1).values.tolist(), abs=1e-6)
    # Same images as val, same model: the test rows repeat the validation rows (the predict path).
    assert [r["probability"] for r in test] == pytest.approx([r["probability"] for r in validation], abs=2e-3)
    assert result.metrics["test"]["accuracy"] == pytest.approx(sum(r["correct"] for r in test) / len(test))
