"""Training as plain functions over explicit objects: data in, best classifier and metrics out.

`train` runs one recipe (or, for strategy "auto", the search in auto.py that picks one):

- linear_probe: backbone frozen; its features are computed once (`FeatureCache`) and the head is
  fitted on them. Augmentation "light" adds each training image's mirror to the cache.
- fine_tune / partial / gradual: the head and some backbone stages train on augmented images;
  `unfreeze_plan` says how many stages (counted from the output) train in each epoch, and
  `stage_param_groups` gives each stage its own rate (`lr_stage_factor`).

Every strategy honours `bn_mode` (BatchNorm running statistics frozen, batch statistics in trained
stages, or AdaBN re-estimation before training), keeps the best epoch by `monitor` (early stopping
after `patience` epochs without improvement), then fits a temperature on the val logits; the
classifier carries that temperature and `tta_flip` to the artifact and to /predict.

A test split (`PreparedData.test_x`) is taken off the data before any strategy runs, so nothing
trains, stops early, calibrates or chooses on it; the finished classifier is then scored on it
through its own predict path (`metrics["test"]`, the val metrics' names without "val_").

The epoch loops hold explicit optimizer, scheduler and torch.Generator objects (the generator
draws batches and augmentation; torch's global RNG only MixUp/CutMix coefficients), which is what
a checkpoint needs to resume an epoch exactly. On a GPU the decoded images live on the device
(`PreparedData.on`) and whole batches are augmented there (`BatchAugment`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from workers.artifacts import Classifier
from workers.config import TrainConfig
from workers.device import autocast, inference_batch_size, pick_device
from workers.metrics import classification_metrics, multilabel_metrics
from workers.preprocessing import eval_crop, normalize
from workers.progress import PhaseMeter
from workers.training.auto import train_auto
from workers.training.contract import Control, PreparedData, TrainResult
from workers.training.parts import index_batches
from workers.training.recipe import train_recipe

__all__ = ["Control", "PreparedData", "TrainResult", "train", "train_recipe"]


def train(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
          control: Control, device: torch.device | None = None,
          init_head: Callable[[Classifier], object] | None = None) -> TrainResult:
    """`init_head`: an explicit recipe's head starts from it (a base model's rows, workers/base_model.py)."""
    device = device or pick_device()
    given = data
    data = dataclasses.replace(data, test_x=None, test_y=None).on(device)  # no strategy can read test
    if data.multi_label:  # issue 17: a sigmoid per label (workers/training/multilabel.py)
        from workers.training.multilabel import train_multilabel
        result = train_multilabel(config, data, features, feature_dim, control, device, init_head)
    elif config.strategy == "auto":
        result = train_auto(config, data, features, feature_dim, control, device)
    else:
        result = train_recipe(config, data, features, feature_dim, control, device, checkpoints=True,
                              init_head=init_head)
    fit_unknown(result, data)
    if result.preprocessing is not None and given.test_x is not None:  # auto chose another backbone
        given = given.at_backbone(result.recipe["backbone"])[0]
    test_x, test_y = given.test_x, given.test_y
    if test_x is not None and len(test_x):
        meter = PhaseMeter(control, "scoring the test split", len(test_x), "images")
        result.test_probabilities = predicted_probabilities(result.classifier, test_x, given, device, control, meter)
        result.metrics["test"] = score_held_out(result.test_probabilities, test_y, given, result.classifier.thresholds)
        result.metrics["num_test_images"] = len(test_y)
    return result


def fit_unknown(result: TrainResult, data: PreparedData) -> None:
    """Issue 17, "none of these": the model's out-of-distribution score and threshold, fitted on its
    held-out predictions only (never the test split: `data` has none here), kept on the classifier
    (so the artifact carries it) and in the metrics; the negative class reported apart."""
    from workers.ood import fit_ood, negative_metrics
    if getattr(data, "multi_label", False):  # "none of these" is for single-label models
        return
    held = result.held_out
    pooled_y = torch.cat([data.train_y, data.val_y]).cpu() if held is not None and held.features is not None else None
    ood = fit_ood(held, data.classes, float(result.classifier.temperature),
                  held.features if held is not None else None, pooled_y, seed=int(result.recipe.get("seed") or 0)
                  if result.recipe else 0)
    result.classifier.ood = ood
    if ood is not None:
        result.metrics["ood"] = ood.config()
    negative_metrics(result.metrics, data.classes)


def predicted_probabilities(classifier: Classifier, x_u8: torch.Tensor, data: PreparedData, device: torch.device,
                            control: Control, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """The finished classifier's Classifier.predict_proba on the eval crop of each image (calibrated,
    mirror-averaged when tta_flip): what /predict answers for them, [N, classes] on the host."""
    classifier.to(device).eval()
    probs = []
    try:
        for idx in index_batches(len(x_u8), inference_batch_size(device), None):
            x = normalize(eval_crop(x_u8[idx], data.preprocessing).to(device), data.preprocessing)
            with autocast(device):  # as the serving engine runs the backbone
                probs.append(classifier.predict_proba(x).float().cpu())
            control.stop_if_asked()
            if on_batch is not None:
                on_batch(len(idx))
    finally:
        classifier.to("cpu")  # where a TrainResult's classifier lives
    return torch.cat(probs)


def score_held_out(probs: torch.Tensor, y: torch.Tensor, data: PreparedData,
                   thresholds: list[float] | None = None) -> dict:
    """Scores of held-out images' predicted probabilities, named as the val metrics without "val_"
    (multi-label, y [N, C]: at the model's `thresholds`; issue 17)."""
    if y.ndim == 2:
        scores = multilabel_metrics(y.cpu(), probs, thresholds or [0.5] * len(data.classes), data.classes)
    else:
        scores = classification_metrics(y.cpu(), probs, data.classes)
    renamed = {"val_accuracy": "accuracy", "val_loss": "loss", "num_val_images": "num_images"}
    return {renamed.get(key, key): value for key, value in scores.items()}

