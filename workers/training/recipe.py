"""One explicit recipe, trained and calibrated."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from workers.artifacts import Classifier
from workers.config import TrainConfig
from workers.device import single_thread
from workers.training.contract import Control, HeldOut, PreparedData, TrainResult
from workers.training.finetune import fine_tune
from workers.training.parts import adapt_batchnorm, best_report, calibrate_and_score, logits_of
from workers.training.probe import FeatureCache, fit_head, pooled_features
from workers.training.top import fine_tune_top


def train_recipe(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
                 control: Control, device: torch.device, cache: FeatureCache | None = None,
                 deadline: float | None = None, checkpoints: bool = False,
                 init_head: Callable[[Classifier], object] | None = None) -> TrainResult:
    """One explicit recipe. A linear probe may be handed a `cache` of the same backbone's features.
    With a `deadline` (time.perf_counter()), fine-tuning ends after the last epoch that fits.
    `init_head` sets the new head's starting weights (a base model's rows) where a head trains by
    gradient; a logistic-regression fit (solver lbfgs) has no start to set."""
    torch.manual_seed(config.seed)
    classifier = Classifier(features, feature_dim, len(data.classes), head=config.head,
                            hidden_dim=config.hidden_dim, dropout=config.dropout)
    if init_head is not None and config.strategy not in ("fine_tune_top",) and config.solver != "lbfgs":
        init_head(classifier)
    classifier.tta_flip = bool(config.tta_flip)
    classifier.to(device, memory_format=torch.channels_last)
    started = time.perf_counter()
    if config.strategy == "linear_probe":
        if cache is None:
            if config.bn_mode == "adabn":
                adapt_batchnorm(features, data.train_x, data.preprocessing, device, control)
            mirrors = (("train",) if config.augmentation == "light" else ()) + (("val",) if config.tta_flip else ())
            cache = FeatureCache(features, data, device, control, mirrors)  # one phase for every pass
        if config.augmentation == "light":
            cache.mirror("train")  # backbone passes: before the head's single-threaded loop
        if config.tta_flip:
            cache.mirror("val")
        with single_thread(device):
            history, val_logits, seen = fit_head(config, classifier, cache, data.train_y, data.val_y, control)
    elif config.strategy == "fine_tune_top":  # its own classifier, on a copy of `features`
        classifier, history, val_logits, seen = fine_tune_top(config, data, features, control, device, deadline,
                                                              init_head)
    else:
        history, seen = fine_tune(config, data, classifier, control, device, deadline, checkpoints)
        classifier.eval()
        val_logits = logits_of(classifier, data.val_x, data.preprocessing, device, control, bool(config.tta_flip))
    seconds = time.perf_counter() - started
    with single_thread(device):
        metrics = calibrate_and_score(classifier, val_logits, data.val_y, data.classes, config.target_precision)
    best = best_report(history, config.monitor)
    metrics.update(best_epoch=best["epoch"], epochs_run=len(history),
                   stopped_early=len(history) < (config.epochs or 0),
                   stopped_by=("deadline" if history and history[-1].get("deadline") else
                               "patience" if len(history) < (config.epochs or 0) else None),
                   train_seconds=round(seconds, 3),
                   # None when no image went through the backbone (features reused from a past job)
                   train_images_per_s=round(seen / seconds, 1) if seconds and seen else None,
                   num_train_images=int(len(data.train_y)))
    if cache is not None:
        metrics["features_reused"] = cache.reused  # from an earlier job on the same images and weights
    n_train = len(data.train_y)
    held_out = HeldOut(val_logits.float().cpu(), data.val_y.cpu(), torch.arange(n_train, n_train + len(data.val_y)),
                       "val", features=pooled_features(cache, bool(config.tta_flip)) if cache is not None else None)
    return TrainResult(classifier.to("cpu").float(), metrics, history, config.model_dump(), held_out=held_out)


