"""A model's held-out predictions, per image: which images it gets wrong, and how badly.

Every model keeps, beside its weights, the predictions its val metrics were computed from
(`TrainResult.held_out`: the val split's, or for auto without a val split the winner's out-of-fold
ones over every labeled image), and its test split's as /predict answers them:

- `evaluation.json`: one row per image, `image_id` (the blob sha256, as the dataset lists it),
  `subset` ("validation": what the model's metrics and confusion matrix count; "test"), `split`
  (the image's role in the job: train, val or test), true and predicted label, the calibrated
  probability of the predicted label and of the true one, and the loss (-log of the true one).
- `held_out.safetensors`: the validation rows' uncalibrated logits [N, classes], in the same order,
  from which the reliability diagram and per-class precision-recall are drawn.

Calibrated means with the model's temperature, so for a model trained on train only (any explicit
strategy, auto with your val split) a validation row is what /predict answers for that image. For
auto cross-validating over all labeled images, a row is the prediction of a fold model that did not
see the image; the refitted model has seen every one of them, so its own answers there are not
held out. Both files are written with the artifact (workers.artifacts.write_artifact `extra`), and
read by the API (service/serving/insights.py). JSON and safetensors: nothing here unpickles.
"""
from __future__ import annotations

import json
import math

import torch
from safetensors.torch import load, save

from workers.artifacts import calibrated_probabilities
from workers.training.contract import HeldOut, PreparedData, TrainResult

EVALUATION_FILE = "evaluation.json"
LOGITS_FILE = "held_out.safetensors"
FORMAT = 1
VALIDATION, TEST = "validation", "test"
MIN_PROBABILITY = 1e-12  # the loss of a certain mistake is finite: -log(1e-12) = 27.6


def rows_of(probs: torch.Tensor, y: torch.Tensor, ids: list[str], splits: list[str], classes: list[str],
            subset: str) -> list[dict]:
    """One row per image from calibrated probabilities [N, classes] and true labels [N]."""
    probs = probs.double().cpu()
    predicted = probs.argmax(1).tolist()
    rows = []
    for i, (image_id, split) in enumerate(zip(ids, splits)):
        t, p = int(y[i]), predicted[i]
        true_p = float(probs[i, t])
        rows.append({"image_id": image_id, "subset": subset, "split": split, "true_label": classes[t],
                     "predicted_label": classes[p], "correct": t == p,
                     "probability": round(float(probs[i, p]), 6), "true_probability": round(true_p, 6),
                     "loss": round(-math.log(max(true_p, MIN_PROBABILITY)), 6)})
    return rows


def evaluation_files(result: TrainResult, data: PreparedData) -> dict[str, bytes]:
    """The two files for a finished model ({} when the data carries no image ids or the recipe no
    held-out logits: data made outside the worker)."""
    held: HeldOut | None = result.held_out
    # Multi-label models (issue 17) keep their held-out scores in metrics (per label) but no per-image file yet.
    if held is None or data.train_ids is None or data.val_ids is None or getattr(data, "multi_label", False):
        return {}
    pooled_ids = data.train_ids + data.val_ids
    pooled_splits = ["train"] * len(data.train_ids) + ["val"] * len(data.val_ids)
    order = held.rows.tolist()
    temperature = float(result.classifier.temperature)
    probs = calibrated_probabilities(held.logits.float(), temperature)
    rows = rows_of(probs, held.y, [pooled_ids[r] for r in order], [pooled_splits[r] for r in order],
                   data.classes, VALIDATION)
    if result.test_probabilities is not None and data.test_ids is not None and data.test_y is not None:
        rows += rows_of(result.test_probabilities, data.test_y, data.test_ids, ["test"] * len(data.test_ids),
                        data.classes, TEST)
    document = {"format": FORMAT, "classes": list(data.classes), "temperature": temperature,
                "predictions": held.predictions, "rows": rows}
    logits = {"logits": held.logits.float().contiguous(), "labels": held.y.long().contiguous()}
    return {EVALUATION_FILE: json.dumps(document, separators=(",", ":")).encode(), LOGITS_FILE: save(logits)}


def held_out_summary(files: dict[str, bytes]) -> dict:
    """What the model's metrics say of its held-out predictions (`metrics.held_out`)."""
    document = read_evaluation(files[EVALUATION_FILE])
    subsets = [row["subset"] for row in document["rows"]]
    return {"predictions": document["predictions"], "images": subsets.count(VALIDATION),
            "test_images": subsets.count(TEST)}


def read_evaluation(data: bytes) -> dict:
    document = json.loads(data)
    if document.get("format") != FORMAT:
        raise ValueError(f"evaluation format {document.get('format')!r}; this Graft reads {FORMAT}")
    return document


def read_logits(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation rows' logits [N, classes] and true labels [N]."""
    tensors = load(data)
    return tensors["logits"], tensors["labels"]
