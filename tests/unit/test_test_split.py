"""The test split at training time: nothing trains or chooses on it, and the finished model is
scored on it the way /predict would answer."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.support.data import hymenoptera_files
from tests.support.training import PRE, SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.config import TrainConfig
from workers.preprocessing import decode_square, eval_crop, normalize
from workers.training import PreparedData, train

pytestmark = pytest.mark.usefixtures("one_thread")
TIMING = {"train_seconds", "train_images_per_s"}


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return tiny_data()


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """Eight val photos the tiny training set does not hold, and their true labels."""
    xs, ys = [], []
    for y, label in enumerate(("ants", "bees")):
        for p in hymenoptera_files("val", label)[10:14]:
            xs.append(decode_square(p.read_bytes(), PRE))
            ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


def run(data: PreparedData, **overrides):
    config = TrainConfig(**{"strategy": "linear_probe", "epochs": 3, "batch_size": 4, "image_size": 64,
                            "seed": 7, **overrides})
    features = SPEC.build_features(pretrained=True)
    return train(config, data, features, SPEC.feature_dim, Recorder(), torch.device("cpu"))


def test_test_images_change_nothing_the_model_learns_or_reports(data, held_out):
    x, y = held_out
    wrong = 1 - y  # every test label wrong: any use of them in training or selection would show
    plain, held, right = run(data), run(dataclasses.replace(data, test_x=x, test_y=wrong)), \
        run(dataclasses.replace(data, test_x=x, test_y=y))
    for result in (held, right):
        assert result.history == plain.history
        assert {k: v for k, v in result.metrics.items() if k not in TIMING | {"test", "num_test_images"}} == \
            {k: v for k, v in plain.metrics.items() if k not in TIMING}
        for (name, a), b in zip(result.classifier.state_dict().items(), plain.classifier.state_dict().values()):
            assert torch.equal(a, b), name
    assert "test" not in plain.metrics and "num_test_images" not in plain.metrics
    assert held.metrics["num_test_images"] == right.metrics["num_test_images"] == 8
    # Two classes: with every label flipped, each right answer becomes a wrong one.
    assert held.metrics["test"]["accuracy"] == pytest.approx(1 - right.metrics["test"]["accuracy"], abs=1e-6)
    assert held.metrics["test"]["accuracy"] <= 0.375 and right.metrics["test"]["accuracy"] >= 0.625
    assert held.metrics["test"]["confusion_matrix"]["matrix"] == right.metrics["test"]["confusion_matrix"]["matrix"][::-1]


def test_test_scores_are_what_predict_answers(data, held_out):
    x, y = held_out
    result = run(dataclasses.replace(data, test_x=x, test_y=y), tta_flip=True)
    probs = result.classifier.predict_proba(normalize(eval_crop(x, PRE), PRE))
    test = result.metrics["test"]
    assert test["accuracy"] == pytest.approx((probs.argmax(1) == y).float().mean().item(), abs=1e-6)
    nll = -torch.log(probs[torch.arange(len(y)), y]).mean().item()
    assert test["loss"] == pytest.approx(nll, abs=1e-5)  # calibrated, mirror-averaged probabilities
    assert test["num_images"] == 8 and set(test["per_class"]) == {"ants", "bees"}
    assert {"balanced_accuracy", "macro_f1", "ece"} <= set(test) and "val_accuracy" not in test


def test_cli_shows_the_test_scores_beside_val(capsys):
    from service.cli.commands import _show_metrics

    metrics = {"val_accuracy": 0.9, "num_val_images": 10, "num_test_images": 8,
               "test": {"accuracy": 0.875, "balanced_accuracy": 0.8, "loss": 0.45, "num_images": 8}}
    _show_metrics({"id": "m1", "backbone": "efficientnet_lite0", "recipe": {"strategy": "auto"}, "metrics": metrics})
    shown = capsys.readouterr().out
    assert "test_accuracy" in shown and "0.8750" in shown and "num_test_images" in shown
    _show_metrics({"id": "m2", "backbone": "efficientnet_lite0", "recipe": {}, "metrics": {"val_accuracy": 0.9}})
    assert "test_" not in capsys.readouterr().out
