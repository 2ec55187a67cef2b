"""What /predict answers for a multi-label model (issue 17): every label at or over its threshold,
and every label's score."""
from __future__ import annotations

import torch

from workers.artifacts import LoadedModel


def multi_label_answer(model: LoadedModel, probs: torch.Tensor) -> dict:
    """`labels` (at or over their thresholds, highest score first), `scores` (every label) and
    `label` (the first of labels, None when no label reaches its threshold: the image shows none of
    them, which is an answer, not an unknown); {} for a single-label model."""
    classifier = model.classifier
    if not getattr(classifier, "multi_label", False):
        return {}
    thresholds = classifier.thresholds or [0.5] * len(model.classes)
    values = probs.tolist()
    chosen = sorted((i for i, p in enumerate(values) if p >= thresholds[i]), key=lambda i: -values[i])
    labels = [model.classes[i] for i in chosen]
    return {"labels": labels, "label": labels[0] if labels else None, "unknown": False,
            "scores": {c: round(float(p), 6) for c, p in zip(model.classes, values)}}
