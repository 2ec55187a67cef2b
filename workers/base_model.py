"""Training on from a model (`base_model_id`): its weights as the start, its classes carried over.

A job with a base model trains on the base's backbone weights (fine-tuned or pretrained, whatever
the base was) instead of ImageNet's, with the same backbone architecture. A head trained by
gradient (Adam probes, fine-tuning strategies, fine_tune_top) starts from the base's head: the rows
of classes the new dataset still has are copied by label, the rows of new classes get the usual
seeded initialization, and the rows of classes the dataset no longer has are dropped. A
logistic-regression head (solver lbfgs) is one convex fit whose start changes nothing, so it is
fitted afresh, on the base's features.

After training, the base model predicts the new model's held-out images as /predict would
(`compare`): both are scored on the same images, and apart on those the base never trained on
(`unseen_by_base`; images of the base's own training split would flatter it) and on those whose
class the base knows.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from workers.artifacts import Classifier, LoadedModel
from workers.backbones import Preprocessing
from workers.device import autocast, inference_batch_size
from workers.preprocessing import decode_square, eval_crop, normalize


@dataclass
class BaseStart:
    model_id: str
    model: LoadedModel  # its features may be the process-wide shared backbone: never modified here
    trained_ids: set[str] = field(default_factory=set)  # images the base trained on (blob sha256s)

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes)

    @property
    def preprocessing(self) -> Preprocessing:
        return self.model.preprocessing

    def features(self) -> nn.Module:
        """A copy of the base's backbone, the job's own to train."""
        return copy.deepcopy(self.model.classifier.features).float().eval()

    def seed_head(self, classifier: Classifier, classes: list[str]) -> dict:
        """Copy the base's head into `classifier`'s where they line up: the hidden layer of an mlp
        head of the same width, and by label, each row of the final layer. Returns what was done."""
        base = self.model.classifier
        if base.head_kind != classifier.head_kind or (base.head_kind == "mlp" and base.hidden_dim != classifier.hidden_dim):
            return {"rows_kept": 0, "rows_initialized": len(classes),
                    "note": f"the base's head is {_head_name(base)}, this recipe's {_head_name(classifier)}: "
                            "initialized afresh"}
        index = {label: i for i, label in enumerate(self.classes)}
        mine, theirs = _last_linear(classifier), _last_linear(base)
        kept = 0
        with torch.no_grad():
            if base.head_kind == "mlp":
                classifier.head[0].weight.copy_(base.head[0].weight)
                classifier.head[0].bias.copy_(base.head[0].bias)
            for row, label in enumerate(classes):
                if label in index:
                    mine.weight[row].copy_(theirs.weight[index[label]])
                    mine.bias[row].copy_(theirs.bias[index[label]])
                    kept += 1
        return {"rows_kept": kept, "rows_initialized": len(classes) - kept}


def _last_linear(classifier: Classifier) -> nn.Linear:
    return classifier.head if isinstance(classifier.head, nn.Linear) else classifier.head[-1]


def _head_name(classifier: Classifier) -> str:
    return f"mlp ({classifier.hidden_dim} hidden)" if classifier.head_kind == "mlp" else "linear"


def class_changes(base_classes: list[str], classes: list[str]) -> dict:
    old, new = set(base_classes), set(classes)
    return {"classes_kept": [c for c in classes if c in old], "classes_added": [c for c in classes if c not in old],
            "classes_removed": [c for c in base_classes if c not in new]}


@torch.no_grad()
def base_predictions(base: BaseStart, image_ids: list[str], squares: Callable[[int, int], torch.Tensor] | None,
                     pre: Preprocessing, read: Callable[[str], bytes], device: torch.device) -> list[str]:
    """The base's top label for each image, as /predict answers it: from the job's decoded squares
    (`squares(start, stop)`: those of image_ids[start:stop]) when the base's preprocessing decodes
    them alike, else decoded again at the base's."""
    theirs = base.preprocessing
    same = squares is not None and (theirs.resize_size, theirs.interpolation) == (pre.resize_size, pre.interpolation)
    classifier = base.model.classifier.to(device).eval()
    labels: list[str] = []
    for start in range(0, len(image_ids), inference_batch_size(device)):
        ids = image_ids[start:start + inference_batch_size(device)]
        batch = (squares(start, start + len(ids)) if same
                 else torch.stack([decode_square(read(i), theirs) for i in ids]))
        x = normalize(eval_crop(batch.cpu(), theirs).to(device), theirs)
        with autocast(device):
            probs = classifier.predict_proba(x).float()
        labels += [base.classes[i] for i in probs.argmax(1).tolist()]
    return labels


def compare(base: BaseStart, rows: list[dict], base_labels: list[str]) -> dict:
    """The new model's held-out rows (workers/evaluation.py) against the base's labels for the same
    images: accuracy of each on all of them, on those the base never trained on, and on those of
    classes the base knows."""
    known = set(base.classes)

    def scored(keep: Callable[[dict], bool]) -> dict:
        picked = [(r, b) for r, b in zip(rows, base_labels) if keep(r)]
        if not picked:
            return {"images": 0, "model_accuracy": None, "base_accuracy": None}
        return {"images": len(picked),
                "model_accuracy": round(sum(r["correct"] for r, _ in picked) / len(picked), 6),
                "base_accuracy": round(sum(r["true_label"] == b for r, b in picked) / len(picked), 6)}

    out = scored(lambda r: True)
    out["unseen_by_base"] = scored(lambda r: r["image_id"] not in base.trained_ids)
    out["of_classes_the_base_knows"] = scored(lambda r: r["true_label"] in known)
    out["of_classes_the_base_knows"]["unseen_by_base"] = scored(
        lambda r: r["true_label"] in known and r["image_id"] not in base.trained_ids)
    return out


def trained_ids(dataset_images: list[tuple[str, str | None]], held_out_ids: set[str] | None,
                trained_on_splits: list[str] | None) -> set[str]:
    """The images a model trained on, from its dataset version's (sha256, split) rows: every image
    but the test split's, less its held-out (val) ones when it trained on train only. Without its
    held-out predictions (a model from before they were kept) every non-test image counts as trained."""
    pool = {sha for sha, split in dataset_images if split != "test"}
    if held_out_ids is None or (trained_on_splits and "val" in trained_on_splits):
        return pool
    return pool - held_out_ids
