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
