"""Classification metrics a user reads on a model: accuracy, balanced accuracy, macro-F1, top-5,
per-class P/R/F1/support, confusion matrix, ECE."""
from __future__ import annotations

import torch

from workers.calibration import ECE_BINS, expected_calibration_error


def classification_metrics(y_true: torch.Tensor, probs: torch.Tensor, classes: list[str]) -> dict:
    """`probs` [N, C] probabilities; rows of the confusion matrix are true labels, columns predictions."""
    n_cls = len(classes)
    y_pred = probs.argmax(dim=1)
    cm = torch.bincount(y_true * n_cls + y_pred, minlength=n_cls * n_cls).view(n_cls, n_cls)
    tp = cm.diag().double()
    support = cm.sum(dim=1).double()
    predicted = cm.sum(dim=0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    present = support > 0
    nll = -torch.log(probs[torch.arange(len(y_true)), y_true].clamp(min=1e-12)).mean()
    extra = {}
    if n_cls > 5:
        top5 = (probs.topk(5, dim=1).indices == y_true[:, None]).any(dim=1).float().mean()
        extra["top5_accuracy"] = round(float(top5), 6)
    return {
        "val_accuracy": round(float(tp.sum() / max(1, len(y_true))), 6),
        "val_loss": round(float(nll), 6),
        "balanced_accuracy": round(float(recall[present].mean()) if present.any() else 0.0, 6),
        "macro_f1": round(float(f1[present].mean()) if present.any() else 0.0, 6),
        **extra,
        "ece": round(expected_calibration_error(probs, y_true), 6),
        "ece_bins": ECE_BINS,
        "num_val_images": int(len(y_true)),
        "per_class": {
            c: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion_matrix": {"labels": list(classes), "matrix": cm.tolist()},
    }


# --- multi-label (issue 17) ---------------------------------------------------------------------

PR_POINTS = 50  # per-label precision-recall points kept in a model's metrics


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """AP as scikit-learn's average_precision_score computes it: sum over the distinct scores, from
    the highest, of (recall gained) x (precision there). None when there is no positive."""
    positive = positive.double()
    n_pos = float(positive.sum())
    if n_pos == 0:
        return None
    precision, recall, _ = _pr_curve(scores, positive)
    gained = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), recall]))
    return float((gained * precision).sum())


def _pr_curve(scores: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision and recall of "score >= t" for each distinct score t, highest first."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, p = scores.double()[order], positive.double()[order]
    tp, fp = torch.cumsum(p, 0), torch.cumsum(1 - p, 0)
    last = torch.ones(len(s), dtype=torch.bool)  # the last of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    tp, fp, t = tp[last], fp[last], s[last]
    return tp / (tp + fp), tp / max(float(p.sum()), 1.0), t


def multilabel_metrics(y: torch.Tensor, probs: torch.Tensor, thresholds: list[float], classes: list[str]) -> dict:
    """`y` [N, C] of 0/1, `probs` [N, C] calibrated per-label probabilities; a label is predicted at
    or over its threshold. mAP (macro: the mean AP of the labels that have positives; micro: AP of
    every (image, label) pair pooled), per-label AP and P/R/F1 at the thresholds, subset accuracy
    (every label of the image right), Hamming loss (share of wrong image-label pairs), PR points.
    `val_accuracy` is the subset accuracy and `val_loss` the mean binary cross-entropy, so the
    fields every model has keep their meaning."""
    y, probs = y.double().cpu(), probs.double().cpu()
    t = torch.tensor(thresholds, dtype=torch.float64)
    predicted = probs >= t[None, :]
    truth = y > 0.5
    tp = (predicted & truth).sum(0).double()
    fp = (predicted & ~truth).sum(0).double()
    fn = (~predicted & truth).sum(0).double()
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    aps = [average_precision(probs[:, i], y[:, i]) for i in range(len(classes))]
    present = [a for a in aps if a is not None]
    micro_tp, micro_fp, micro_fn = float(tp.sum()), float(fp.sum()), float(fn.sum())
    micro_p = micro_tp / (micro_tp + micro_fp) if micro_tp + micro_fp else 0.0
    micro_r = micro_tp / (micro_tp + micro_fn) if micro_tp + micro_fn else 0.0
    eps = 1e-12
    bce = -(y * probs.clamp(eps, 1).log() + (1 - y) * (1 - probs).clamp(eps, 1).log()).mean()
    support = truth.sum(0)
    subset = float((predicted == truth).all(1).double().mean()) if len(y) else 0.0
    has_positives = support > 0
    return {
        "task": "multi_label",
        "map_macro": round(sum(present) / len(present), 6) if present else None,
        "map_micro": round(average_precision(probs.flatten(), y.flatten()) or 0.0, 6),
        "subset_accuracy": round(subset, 6),
        "hamming_loss": round(float((predicted != truth).double().mean()) if len(y) else 0.0, 6),
        "micro_f1": round(2 * micro_p * micro_r / (micro_p + micro_r), 6) if micro_p + micro_r else 0.0,
        "macro_f1": round(float(f1[has_positives].mean()) if has_positives.any() else 0.0, 6),
        "val_accuracy": round(subset, 6),
        "val_loss": round(float(bce), 6),
        "num_val_images": int(len(y)),
        "thresholds": {c: round(float(t[i]), 6) for i, c in enumerate(classes)},
        "per_label": {
            c: {"ap": round(aps[i], 6) if aps[i] is not None else None, "threshold": round(float(t[i]), 6),
                "precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                "f1": round(float(f1[i]), 6), "support": int(support[i]), "predicted": int(predicted[:, i].sum())}
            for i, c in enumerate(classes)
        },
        "pr_curves": {c: pr_points(probs[:, i], y[:, i]) for i, c in enumerate(classes)},
    }


def pr_points(scores: torch.Tensor, positive: torch.Tensor, points: int = PR_POINTS) -> dict:
    """At most `points` (precision, recall, threshold) points of one label's PR curve, evenly spaced
    along it (the first and last kept)."""
    if float(positive.sum()) == 0:
        return {"precision": [], "recall": [], "thresholds": []}
    precision, recall, thresholds = _pr_curve(scores, positive)
    keep = torch.linspace(0, len(thresholds) - 1, min(points, len(thresholds))).round().long().unique()
    return {"precision": [round(float(v), 4) for v in precision[keep]],
            "recall": [round(float(v), 4) for v in recall[keep]],
            "thresholds": [round(float(v), 6) for v in thresholds[keep]]}
