"""Semi-supervised learning from a dataset's unlabeled images (issue 16): self-training of a
logistic head on frozen features.

Each round the head labels the pool of unlabeled images; the confident ones join the next fit
with a smaller weight than real labels (PSEUDO_WEIGHT). Confidence is a calibrated probability:
a temperature fitted on out-of-fold predictions of the labeled images the head trains on (two
inner folds), never on images it is scored on. Class-balanced (after CBST, Zou et al. 2018,
"Unsupervised domain adaptation for semantic segmentation via class-balanced self-training"):
each class has its own threshold, the larger of MIN_CONFIDENCE and the confidence that only the
round's share (SHARES) of the images predicted as that class reach, and no class takes more than
BALANCE times the median class's count, so one easy class cannot swamp the rest. Pseudo-labels
are chosen afresh each round from the newest head.

Honesty: this runs on a fold's training rows only (`out_of_fold`), so an image that is scored never
trains, calibrates or chooses a threshold for the head that scores it, and a pseudo-labeled image
is never scored: the held-out estimate counts labeled images only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import workers.training.logistic as logistic
import workers.training.selection as selection
from workers.calibration import fit_temperature

ROUNDS = 3
SHARES = (0.3, 0.6, 0.9)  # per round: the most confident share of each class's predicted images
MIN_CONFIDENCE = 0.8  # calibrated probability a pseudo-label needs in every round
BALANCE = 2.0  # no class gets more than this times the median class's pseudo-labels
PSEUDO_WEIGHT = 0.5  # a pseudo-labeled image weighs half a labeled one in the fit


@dataclass
class PseudoLabels:
    index: torch.Tensor  # rows of the unlabeled pool, ascending
    labels: torch.Tensor  # the class given to each
    confidence: torch.Tensor  # its calibrated probability
    thresholds: torch.Tensor  # [classes] the threshold each class's images had to reach (inf: none could)


def class_thresholds(probs: torch.Tensor, share: float, floor: float = MIN_CONFIDENCE) -> torch.Tensor:
    """Per class: max(floor, the confidence reached by the top `share` of the images predicted as it)."""
    conf, pred = probs.max(1)
    thresholds = torch.full((probs.shape[1],), math.inf, dtype=torch.float64)
    for c in range(probs.shape[1]):
        mine = conf[pred == c].double()
        if len(mine):
            thresholds[c] = max(floor, float(torch.quantile(mine, 1.0 - share)))
    return thresholds


def select_pseudo_labels(probs: torch.Tensor, share: float, floor: float = MIN_CONFIDENCE,
                         balance: float = BALANCE) -> PseudoLabels:
    """The pool's images confident enough for their predicted class's threshold, class-balanced."""
    conf, pred = probs.float().max(1)
    thresholds = class_thresholds(probs, share, floor)
    accepted = conf.double() >= thresholds[pred]
    counts = torch.bincount(pred[accepted], minlength=probs.shape[1])
    if counts.sum():
        cap = math.ceil(balance * max(1.0, float(counts[counts > 0].float().median())))
        for c in torch.nonzero(counts > cap).flatten().tolist():
            members = torch.nonzero(accepted & (pred == c)).flatten()
            drop = members[conf[members].argsort(descending=True)[cap:]]
            accepted[drop] = False
    index = torch.nonzero(accepted).flatten()
    return PseudoLabels(index, pred[index], conf[index], thresholds)


def _fit(x, x_mirror, y, weights, num_classes: int, c: float, balanced: bool) -> logistic.LinearMap:
    """A weighted logistic fit on the images and their mirrors (augmentation "light")."""
    train_x, train_y = logistic.training_set(x, y, x_mirror)
    w = torch.cat([weights, weights]) if x_mirror is not None else weights
    return logistic.LogisticPath(train_x, train_y, num_classes, balanced, sample_weight=w).fit(c)


def inner_temperature(x, x_mirror, y, num_classes: int, c: float, balanced: bool, seed: int) -> float:
    """A temperature from two inner folds of these labeled images: each half predicted by a head
    fitted on the other half (the heads that label the pool are calibrated without looking at
    the images they will be scored on)."""
    if len(y) < 4:
        return 1.0
    folds = selection.stratified_folds(y, 2, seed)
    if any(len(torch.unique(y[folds != f])) < 2 for f in (0, 1)):  # a half with one class: no fit to calibrate
        return 1.0
    logits = torch.zeros(len(y), num_classes)
    ones = torch.ones(len(y), dtype=torch.float64)
    for f in (0, 1):
        fit_rows, out_rows = folds != f, folds == f
        fit = _fit(x[fit_rows], None if x_mirror is None else x_mirror[fit_rows], y[fit_rows], ones[fit_rows],
                   num_classes, c, balanced)
        logits[out_rows] = logistic.head_logits(fit, x[out_rows], None if x_mirror is None else x_mirror[out_rows])
    return fit_temperature(logits, y)


@dataclass
class SelfTrained:
    fit: logistic.LinearMap
    temperature: float
    rounds: list[dict]  # per round: pseudo-labels per class index, thresholds
    last: PseudoLabels | None  # the final round's pseudo-labels (those the returned head trained on)


def self_train(x: torch.Tensor, x_mirror: torch.Tensor | None, y: torch.Tensor, pool: torch.Tensor,
               pool_mirror: torch.Tensor | None, num_classes: int, c: float, balanced: bool = False,
               seed: int = 0, rounds: int = ROUNDS, weight: float = PSEUDO_WEIGHT) -> SelfTrained:
    """A logistic head trained on labeled features (x, y) and, for `rounds` rounds, on the
    confident pseudo-labels it gives the pool's features."""
    x, y, pool = x.cpu(), y.cpu(), pool.cpu()
    x_mirror = None if x_mirror is None else x_mirror.cpu()
    pool_mirror = None if pool_mirror is None else pool_mirror.cpu()
    temperature = inner_temperature(x, x_mirror, y, num_classes, c, balanced, seed)
    ones = torch.ones(len(y), dtype=torch.float64)
    fit = _fit(x, x_mirror, y, ones, num_classes, c, balanced)
    history, last = [], None
    for share in SHARES[:rounds]:
        if not len(pool):
            break
        logits = logistic.head_logits(fit, pool, pool_mirror)
        chosen = select_pseudo_labels(torch.softmax(logits / temperature, dim=1), share)
        history.append({"share": share, "pseudo_labels": torch.bincount(chosen.labels, minlength=num_classes).tolist(),
                        "thresholds": [round(float(t), 4) if math.isfinite(t) else None
                                       for t in chosen.thresholds.tolist()]})
        if not len(chosen.index):
            break
        last = chosen
        both_x = torch.cat([x, pool[chosen.index]])
        both_m = None if x_mirror is None else torch.cat([x_mirror, pool_mirror[chosen.index]])
        weights = torch.cat([ones, torch.full((len(chosen.index),), weight, dtype=torch.float64)])
        fit = _fit(both_x, both_m, torch.cat([y, chosen.labels]), weights, num_classes, c, balanced)
    return SelfTrained(fit, temperature, history, last)


def out_of_fold(x: torch.Tensor, x_mirror: torch.Tensor | None, y: torch.Tensor, folds: torch.Tensor,
                pool: torch.Tensor, pool_mirror: torch.Tensor | None, num_classes: int, c: float,
                balanced: bool = False, tta: bool = True, seed: int = 0, scored_folds: list[int] | None = None
                ) -> torch.Tensor:
    """Each labeled image's logits from a head self-trained without it: per fold, on the other
    folds' labeled images and the pool (rows of folds not in `scored_folds` stay zero)."""
    logits = torch.zeros(len(y), num_classes)
    for f in (scored_folds if scored_folds is not None else range(int(folds.max()) + 1)):
        fit_rows, out_rows = folds != f, folds == f
        trained = self_train(x[fit_rows], None if x_mirror is None else x_mirror[fit_rows], y[fit_rows], pool,
                             pool_mirror, num_classes, c, balanced, seed)
        mirror = x_mirror[out_rows] if (tta and x_mirror is not None) else None
        logits[out_rows] = logistic.head_logits(trained.fit, x[out_rows], mirror)
    return logits


def summary(trained: SelfTrained, classes: list[str], pool_size: int) -> dict:
    """metrics.semi_supervised of a model self-trained on all its labeled images."""
    last = trained.last
    counts = torch.bincount(last.labels, minlength=len(classes)).tolist() if last is not None else [0] * len(classes)
    thresholds = [round(float(t), 4) if math.isfinite(t) else None for t in last.thresholds.tolist()] \
        if last is not None else [None] * len(classes)
    return {"used": True, "method": "self-training of the logistic head on frozen features, class-balanced "
                                    "per-class thresholds on calibrated probabilities",
            "unlabeled_images": pool_size, "pseudo_labeled": int(sum(counts)),
            "pseudo_labels": dict(zip(classes, counts)), "thresholds": dict(zip(classes, thresholds)),
            "temperature": round(trained.temperature, 4), "rounds": len(trained.rounds),
            "weight": PSEUDO_WEIGHT, "min_confidence": MIN_CONFIDENCE,
            "per_round": [{**r, "pseudo_labels": dict(zip(classes, r["pseudo_labels"]))} for r in trained.rounds]}
