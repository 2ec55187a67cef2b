"""Multi-label training (issue 17): a sigmoid per label, binary cross-entropy, and each label's
calibration and threshold fitted on held-out predictions only.

- Every explicit strategy trains as it does for one label per image, with the loss swapped
  (`parts.make_criterion` -> `bce_criterion`: binary cross-entropy per label, `class_weighting
  "balanced"` weighting each label's positives by its negatives/positives ratio, so rare labels
  count) and its epochs scored by macro mAP (`multilabel_epoch_scores`; early stopping and the
  best epoch follow it). linear_probe with solver lbfgs fits one-vs-rest logistic regression on
  the frozen features (`OvrPath`: each label's L2-regularized logistic loss, all labels in one
  L-BFGS run; the losses are separable, so it is exactly one binary logistic regression per label,
  scikit-learn's objective with its C).
- auto: those one-vs-rest heads over `logistic.C_GRID`, on the frozen features of each image and
  its mirror, predicting mirror-averaged. Graft made the val split: cross-validated over train + val
  (k folds stratified by each image's rarest label), the best out-of-fold macro mAP wins and is
  refitted on every labeled image. The user gave it: trained on train, chosen on val (refit: then
  trained on train + val).
- Calibration: Platt scaling per label on the held-out logits (sigmoid(a z + b), a > 0, with
  Platt's smoothed targets so that a perfectly separated label stays finite).
- Thresholds: per label, on the calibrated held-out probabilities: the best F1, or with
  `target_precision` the lowest threshold whose precision reaches it (the most recall at that
  precision). Held out means val, or out of fold: never an image the scoring model trained on.

Not (yet) for multi-label datasets: base_model_id, sampler "balanced", MixUp/CutMix; each is
refused with what to use instead.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from workers.artifacts import Classifier, multi_label_probabilities
from workers.config import TrainConfig
from workers.errors import JobError
from workers.metrics import _pr_curve, average_precision, multilabel_metrics
from workers.progress import PhaseMeter
from workers.training.contract import Control, HeldOut, PreparedData, TrainResult
from workers.training.logistic import C_GRID, LinearMap, standardized, training_set

MAX_ITER = 500


# --- the loss, and an epoch's scores ---------------------------------------------------------------

def bce_criterion(config: TrainConfig, train_y: torch.Tensor, device: torch.device) -> Callable:
    """Binary cross-entropy per label (mean over images and labels). Label smoothing pulls targets
    toward 1/2; class_weighting "balanced" weighs each label's positives by negatives / positives."""
    y = train_y.float()
    pos_weight = None
    if config.class_weighting == "balanced":
        positives = y.sum(0)
        pos_weight = ((len(y) - positives).clamp(min=1) / positives.clamp(min=1)).to(device)
    smoothing = config.label_smoothing or 0.0

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        if smoothing:
            target = target * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=pos_weight)
    return criterion


def macro_map(scores: torch.Tensor, y: torch.Tensor) -> float:
    """Mean average precision over the labels that have positives (0 when none has)."""
    aps = [average_precision(scores[:, i], y[:, i]) for i in range(y.shape[1])]
    present = [a for a in aps if a is not None]
    return sum(present) / len(present) if present else 0.0


def multilabel_epoch_scores(logits: torch.Tensor, y: torch.Tensor) -> dict:
    """An epoch's val scores: BCE, subset accuracy at 0.5 (uncalibrated) and macro mAP."""
    logits, y = logits.float().cpu(), y.float().cpu()
    loss = float(F.binary_cross_entropy_with_logits(logits, y))
    subset = float(((logits >= 0) == (y > 0.5)).all(1).float().mean()) if len(y) else 0.0
    return {"val_loss": round(loss, 6), "val_accuracy": round(subset, 6), "val_map": round(macro_map(logits, y), 6)}


# --- one-vs-rest logistic regression ------------------------------------------------------------

class OvrPath:
    """One binary logistic regression per label on standardized features, all labels in one
    full-batch L-BFGS run, warm-started along a path of C (scikit-learn's: C * sum of the log losses
    + |w|^2 / 2 per label; bias unpenalized, but for a 1e-4 pull that keeps a label without
    positives or negatives in this training set finite)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, balanced: bool = False):
        self.z, self.mean, self.std = standardized(x)
        self.y = y.detach().double().cpu()
        n, labels = self.y.shape
        positives = self.y.sum(0)
        self.weight = None
        if balanced:  # scikit-learn's class_weight="balanced", per label
            w_pos = n / (2 * positives.clamp(min=1))
            w_neg = n / (2 * (n - positives).clamp(min=1))
            self.weight = self.y * w_pos + (1 - self.y) * w_neg
        prior = ((positives + 0.5) / (n + 1)).clamp(1e-6, 1 - 1e-6)
        self.theta = torch.zeros(labels, self.z.shape[1] + 1, dtype=torch.float64)
        self.theta[:, -1] = torch.log(prior / (1 - prior))

    def fit(self, c: float) -> LinearMap:
        theta = self.theta.clone().requires_grad_(True)
        n = len(self.y)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=MAX_ITER, tolerance_grad=1e-7, tolerance_change=1e-12,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = self.z @ theta[:, :-1].T + theta[:, -1]
            loss = F.binary_cross_entropy_with_logits(logits, self.y, weight=self.weight, reduction="sum")
            objective = (c * loss + 0.5 * (theta[:, :-1] ** 2).sum() + 0.5e-4 * (theta[:, -1] ** 2).sum()) / n
            objective.backward()
            return objective

        opt.step(closure)
        self.theta = theta.detach()
        w = self.theta[:, :-1] / self.std
        return LinearMap(w, self.theta[:, -1] - w @ self.mean)


def served_logits(fit: LinearMap, x: torch.Tensor, x_mirror: torch.Tensor | None) -> torch.Tensor:
    """float32 logits as /predict computes them: mirror-averaged when the mirror's features are given."""
    logits = fit.logits(x)
    if x_mirror is not None:
        logits = (logits + fit.logits(x_mirror)) / 2
    return logits.float()


def fit_ovr_head(config: TrainConfig, classifier: Classifier, cache, train_y: torch.Tensor, val_y: torch.Tensor,
                 control: Control) -> tuple[list[dict], torch.Tensor, int]:
    """linear_probe, solver lbfgs, multi-label: one-vs-rest logistic regression folded into the head."""
    from workers.training.parts import epoch_report
    mirror = cache.mirror("train").cpu() if config.augmentation == "light" else None
    meter = PhaseMeter(control, "training", 1, "fits", solver="lbfgs")
    x, y = training_set(cache.train.cpu(), train_y.cpu(), mirror)
    fit = OvrPath(x, y, balanced=config.class_weighting == "balanced").fit(config.logistic_c)
    fit.load_into(classifier.head)
    classifier.eval()
    train_loss = float(F.binary_cross_entropy_with_logits(served_logits(fit, x, None), y.float()))
    val_logits = served_logits(fit, cache.val.cpu(), cache.mirror("val").cpu() if config.tta_flip else None)
    report = epoch_report(1, 1, train_loss, val_logits, val_y, 0.0)
    meter.report(1, **report)
    control.stop_if_asked()
    return [report], val_logits, cache.images


# --- calibration and thresholds, on held-out predictions ------------------------------------------

def fit_platt(logits: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per label (a, b) minimizing the log loss of sigmoid(a * logit + b) against Platt's smoothed
    targets ((n+ + 1) / (n+ + 2) for positives, 1 / (n- + 2) for negatives); a = exp(u) > 0, so a
    label's ranking (its AP) is unchanged."""
    z, y = logits.detach().double().cpu(), y.detach().double().cpu()
    positives = y.sum(0)
    negatives = len(y) - positives
    target = y * ((positives + 1) / (positives + 2)) + (1 - y) * (1 / (negatives + 2))
    u = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([u, b], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z * u.clamp(-7, 7).exp() + b, target, reduction="sum") / max(len(y), 1)
        loss.backward()
        return loss

    if len(y):
        opt.step(closure)
    return u.detach().clamp(-7, 7).exp().tolist(), b.detach().tolist()


def tune_thresholds(probs: torch.Tensor, y: torch.Tensor, target_precision: float | None = None,
                    ) -> tuple[list[float], dict[int, dict]]:
    """Each label's threshold on held-out calibrated probabilities (a label is predicted at or over
    it): the best F1 (ties to the higher threshold), or the lowest threshold whose precision reaches
    `target_precision` (if none does, the most precise one, marked met: false). The threshold sits
    halfway between the chosen score and the next lower one, so it decides every held-out image as
    chosen. A label without held-out positives keeps 0.5."""
    thresholds, how = [], {}
    for i in range(y.shape[1]):
        scores, positive = probs[:, i].double().cpu(), (y[:, i] > 0.5).double().cpu()
        if float(positive.sum()) == 0:
            thresholds.append(0.5)
            how[i] = {"tuned": False, "why": "no held-out image has this label"}
            continue
        precision, recall, at = _pr_curve(scores, positive)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        entry: dict = {"tuned": True}
        if target_precision is None:
            k = int(torch.argmax(f1))  # the first maximum: the highest threshold among ties
        else:
            reach = torch.nonzero(precision >= target_precision - 1e-12).flatten()
            if len(reach):
                k = int(reach[-1])  # the lowest threshold that still reaches it: the most recall
                entry["precision_met"] = True
            else:
                k = int(torch.argmax(precision))
                entry["precision_met"] = False
        lower = float(at[k + 1]) if k + 1 < len(at) else 0.0
        thresholds.append((float(at[k]) + lower) / 2)
        entry.update(precision=round(float(precision[k]), 6), recall=round(float(recall[k]), 6),
                     f1=round(float(f1[k]), 6))
        how[i] = entry
    return thresholds, how


def calibrate_and_score_multilabel(classifier: Classifier, logits: torch.Tensor, y: torch.Tensor, classes: list[str],
                                   target_precision: float | None, predictions: str) -> dict:
    """Per-label calibration and thresholds fitted on held-out logits (`predictions` says which:
    "val", "out of fold"), set on the classifier, and the metrics of those predictions with them."""
    logits, y = logits.float().cpu(), y.float().cpu()
    scale, bias = fit_platt(logits, y)
    classifier.multi_label = True
    classifier.label_scale, classifier.label_bias = scale, bias
    probs = multi_label_probabilities(logits, scale, bias)
    thresholds, how = tune_thresholds(probs, y, target_precision)
    classifier.thresholds = thresholds
    metrics = multilabel_metrics(y, probs, thresholds, classes)
    raw = torch.sigmoid(logits.double())
    before = -(y * raw.clamp(1e-12, 1).log() + (1 - y) * (1 - raw).clamp(1e-12, 1).log()).mean()
    metrics["calibration"] = {
        "method": f"Platt scaling per label (sigmoid(a * logit + b)), fitted on the {predictions} predictions",
        "bce_before": round(float(before), 6), "bce_after": metrics["val_loss"],
        "per_label": {c: {"scale": round(scale[i], 6), "bias": round(bias[i], 6)} for i, c in enumerate(classes)},
    }
    metrics["threshold_tuning"] = {
        "method": (f"the lowest threshold whose precision reaches {target_precision}" if target_precision is not None
                   else "the threshold of best F1"),
        "on": f"the {predictions} predictions (images the scoring model did not train on), calibrated",
        "target_precision": target_precision,
        "per_label": {c: how[i] for i, c in enumerate(classes)},
    }
    return metrics


# --- the job ----------------------------------------------------------------------------------------

def check_supported(config: TrainConfig, init_head) -> None:
    if init_head is not None or config.base_model_id:
        raise JobError("unsupported_option", "base_model_id is not available for multi-label datasets yet; train "
                       "without it")
    if config.sampler == "balanced":
        raise JobError("unsupported_option", "sampler 'balanced' draws by class, which a multi-label image does not "
                       "have one of; use class_weighting 'balanced' (it weighs each label's rare positives)")
    if config.mixup_alpha or config.cutmix_alpha:
        raise JobError("unsupported_option", "MixUp and CutMix are not available for multi-label datasets yet; "
                       "leave mixup_alpha and cutmix_alpha at 0")


def train_multilabel(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
                     control: Control, device: torch.device, init_head=None) -> TrainResult:
    """A multi-label job: auto's search, or one explicit recipe (which trains as for one label per
    image, with this module's loss, scores, calibration and thresholds)."""
    from workers.training.recipe import train_recipe
    check_supported(config, init_head)
    if config.strategy == "auto":
        result = train_auto_multilabel(config, data, features, feature_dim, control, device)
    else:
        result = train_recipe(config, data, features, feature_dim, control, device, checkpoints=True)
    result.metrics["task"] = "multi_label"
    return result


def train_auto_multilabel(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
                          control: Control, device: torch.device) -> TrainResult:
    """auto on a multi-label dataset (see the module docstring)."""
    from workers.training import selection
    from workers.training.auto import LOGISTIC, _describe, _no_recipe, _unique, candidate, logistic_classifier
    from workers.training.parts import adapt_batchnorm
    from workers.training.probe import FeatureCache
    started = time.perf_counter()
    heads = _unique([candidate(config, {"strategy": "linear_probe", **LOGISTIC, "logistic_c": c}) for c in C_GRID])
    if not heads:
        raise _no_recipe()
    if config.bn_mode == "adabn":
        adapt_batchnorm(features, data.train_x, data.preprocessing, device, control)
    cache = FeatureCache(features, data, device, control, mirrors=("train", "val"))
    x = torch.cat([cache.train, cache.val]).cpu()
    x_mirror = torch.cat([cache.mirror("train"), cache.mirror("val")]).cpu()
    y = torch.cat([data.train_y, data.val_y]).float().cpu()
    n, n_train = len(y), len(data.train_y)
    flip = [bool(h.tta_flip) for h in heads]
    mirrors_train = [h.augmentation == "light" for h in heads]
    balanced = heads[0].class_weighting == "balanced"
    if data.val_given:
        fit_rows, scored_rows, folds, predictions = torch.arange(n_train), torch.arange(n_train, n), None, "val"
        logits = _fold_logits(heads, x, x_mirror, y, [(fit_rows, scored_rows)], balanced, flip, mirrors_train,
                              control)
    else:
        strata = torch.tensor(_strata(y))
        k = max(2, min(selection.MAX_FOLDS, int(y.sum(0)[y.sum(0) > 0].min()) if y.sum() > 0 else 2))
        folds = selection.stratified_folds(strata, k, config.seed)
        scored_rows, predictions = torch.arange(n), "out of fold"
        splits = [(torch.nonzero(folds != f).flatten(), torch.nonzero(folds == f).flatten()) for f in range(k)]
        logits = _fold_logits(heads, x, x_mirror, y, splits, balanced, flip, mirrors_train, control)
    target = y[scored_rows]
    scores = [(macro_map(l, target), -float(F.binary_cross_entropy_with_logits(l, target))) for l in logits]
    best = max(range(len(heads)), key=lambda i: (scores[i], -i))
    chosen = heads[best]
    refit = not data.val_given or bool(config.refit)
    rows = torch.arange(n) if refit else torch.arange(n_train)
    control.progress({"phase": "auto refit", "backbone": chosen.backbone, "images": len(rows),
                      "candidate": _describe(chosen)})
    fx, fy = training_set(x[rows], y[rows], x_mirror[rows] if mirrors_train[best] else None)
    fit = OvrPath(fx, fy, balanced).fit(chosen.logistic_c)
    classifier = logistic_classifier(features, feature_dim, fit, chosen)
    metrics = calibrate_and_score_multilabel(classifier, logits[best], target, data.classes, config.target_precision,
                                             predictions)
    seconds = time.perf_counter() - started
    trained_on = {"images": len(rows), "splits": ["train", "val"] if refit else ["train"]}
    metrics.update(
        selection_map=round(scores[best][0], 6), trained_on=trained_on, num_train_images=len(rows),
        best_epoch=1, epochs_run=1, stopped_early=False, stopped_by=None, train_seconds=round(seconds, 3),
        train_images_per_s=round(cache.images / seconds, 1) if seconds and cache.images else None,
        features_reused=cache.reused,
        auto={"chosen": chosen.model_dump(), "device": device.type, "search_seconds": round(seconds, 3),
              "selected_on": ("out-of-fold predictions over train + val" if folds is not None else
                              "the val split you gave") + "; macro mAP, then BCE",
              "folds": int(folds.max()) + 1 if folds is not None else None,
              "candidates": [{"recipe": _describe(h), "val_map": round(s[0], 6), "val_loss": round(-s[1], 6),
                              "scored_on": predictions, "images": len(scored_rows)}
                             for h, s in zip(heads, scores)]})
    control.progress({"phase": "auto chose", "auto_choice": _describe(chosen)})
    result = TrainResult(classifier.to("cpu").float(), metrics, [], chosen.model_dump())
    result.held_out = HeldOut(logits[best].float(), target, scored_rows, predictions)
    return result


def _strata(y: torch.Tensor) -> list[int]:
    from workers.data import rarest_labels
    return rarest_labels(y)


def _fold_logits(heads: list[TrainConfig], x, x_mirror, y, splits, balanced: bool, flip: list[bool],
                 mirrors_train: list[bool], control: Control) -> list[torch.Tensor]:
    """Each head's logits on the scored rows of every (fit rows, scored rows) split, trained on the
    fit rows only, in the order of the scored rows (out of fold: every row, in row order)."""
    scored = torch.cat([s for _, s in splits])
    position = torch.empty(int(scored.max()) + 1, dtype=torch.long)
    position[scored] = torch.arange(len(scored))
    out = [torch.zeros(len(scored), y.shape[1]) for _ in heads]
    meter = PhaseMeter(control, "auto search: heads", len(splits), "folds", candidates=len(heads))
    for fit_rows, scored_rows in splits:
        paths: dict[bool, OvrPath] = {}
        for i, h in enumerate(heads):  # strongest regularization first: each fit warm-starts the next
            with_mirror = mirrors_train[i]
            if with_mirror not in paths:
                fx, fy = training_set(x[fit_rows], y[fit_rows], x_mirror[fit_rows] if with_mirror else None)
                paths[with_mirror] = OvrPath(fx, fy, balanced)
            fit = paths[with_mirror].fit(h.logistic_c)
            out[i][position[scored_rows]] = served_logits(fit, x[scored_rows], x_mirror[scored_rows] if flip[i] else None)
            control.stop_if_asked()
        meter.advance(1)
    if len(splits) > 1:  # out of fold: back in the rows' own order (0..n-1)
        order = torch.argsort(scored)
        out = [o[order] for o in out]
    return out
