""""None of these" for single-label models: an out-of-distribution score, and the threshold below
which /predict answers `"label": null, "unknown": true` (issue 17).

Every single-label model keeps a score that says how much an image looks like the images it was
trained on (higher: more alike), and a threshold fitted on the model's held-out predictions
(`TrainResult.held_out`: the val split's, or auto's out-of-fold ones; never the test split) so
that `TARGET_PASS_RATE` of those in-distribution images score at or above it.

The score kinds (measured on hymenoptera and bloodcells, docs/benchmarks.md "Out-of-distribution"):

- "cosine" (the default where it can be fitted): the features the head reads, mirror-averaged when
  the model averages mirrors, centred on the training images' mean and L2-normalised; the score is
  the largest cosine similarity to a user class's mean direction. It needs the features of the
  held-out images, so it is fitted for heads on the frozen backbone (linear probes, auto's logistic
  heads), whose served features are exactly those, and for auto's fine_tune_top, whose folds each
  score their held-out images with their own network (`fold_cosine_scores`). Held out means: with
  a val split, the class means come from the train images and the val images are scored; out of
  fold, the class means of each image come from the other folds (`FEATURE_FOLDS`, stratified,
  seeded). The stored means are then those of every training image. Parameters: `center` [D] and `means` [classes, D], kept in
  the model's weights file (so its sha256 covers them).
- "energy": T * logsumexp(logits / T) with the model's temperature T (Liu et al. 2020): from the
  held-out logits alone, so it is fitted for every other recipe (fine-tuned backbones).
- "max_probability": the calibrated top probability; measured, never chosen (the weakest of the
  three on both data sets); still read from a manifest that names it.
- "mahalanobis" (shared covariance, shrunk): measured for the choice only; not stored.

Negative examples: a class named `NEGATIVE_LABEL` ("_negative": a `_negative/` folder in a zip or
that label in a manifest) trains as an ordinary class of the head; /predict reports an image whose
top class it is as unknown. It takes no part in the score's statistics (class means) or its
threshold (only the user classes' held-out images), and the model's metrics report it apart
(`metrics["negative"]`; its row and column stay in the confusion matrix).

Models written before this (no "ood" in the manifest's "serving") have no score and never answer
unknown.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

NEGATIVE_LABEL = "_negative"
TARGET_PASS_RATE = 0.95
FEATURE_FOLDS = 5
KINDS = ("cosine", "energy", "max_probability")  # what a model may store
MEASURED_KINDS = KINDS + ("mahalanobis",)  # what bench/ood.py compares
# Where each stored kind's score lies (min_score must lie there too); None: any finite number.
RANGES: dict[str, tuple[float, float] | None] = {"cosine": (-1.0, 1.0), "max_probability": (0.0, 1.0),
                                                 "energy": None, "mahalanobis": None}
MAHALANOBIS_SHRINKAGE = 0.5
TIE_MARGIN = 1e-5
OOD_PREFIX = "ood."  # the score's tensors in a state dict


def user_class_index(classes: list[str]) -> torch.Tensor:
    """The positions of the classes a user named (all but the negative class)."""
    return torch.tensor([i for i, c in enumerate(classes) if c != NEGATIVE_LABEL], dtype=torch.long)


def negative_index(classes: list[str]) -> int | None:
    return classes.index(NEGATIVE_LABEL) if NEGATIVE_LABEL in classes else None


# --- the scores ---------------------------------------------------------------------------------

def logit_score(kind: str, logits: torch.Tensor, temperature: float, users: torch.Tensor | None = None) -> torch.Tensor:
    """[N] scores from served (mirror-averaged, uncalibrated) logits [N, classes]. With a negative
    class, only the user classes' logits count (`users`: their positions)."""
    z = logits.float() / temperature
    if kind == "energy":
        if users is not None:
            z = z.index_select(1, users)
        return temperature * torch.logsumexp(z, dim=1)
    if kind == "max_probability":
        probs = torch.softmax(z, dim=1)
        return (probs.index_select(1, users) if users is not None else probs).max(dim=1).values
    raise ValueError(f"not a logit score: {kind!r}")


def directions(feats: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    return F.normalize(feats.float() - center, dim=1)


def cosine_parameters(feats: torch.Tensor, y: torch.Tensor, users: list[int]) -> dict[str, torch.Tensor]:
    """centre [D] and unit class-mean directions [len(users), D] from training features [N, D]."""
    center = feats.float().mean(dim=0)
    z = directions(feats, center)
    means = torch.stack([z[y == c].mean(dim=0) for c in users])
    return {"center": center, "means": F.normalize(means, dim=1)}


def cosine_score(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    return (directions(feats, params["center"]) @ params["means"].T).max(dim=1).values


def mahalanobis_parameters(feats: torch.Tensor, y: torch.Tensor, users: list[int]) -> dict[str, torch.Tensor]:
    """Class means and the precision of the shared within-class covariance, shrunk toward its mean
    variance (few images, many features)."""
    x = feats.double()
    means = torch.stack([x[y == c].mean(dim=0) for c in users])
    rows = torch.cat([x[y == c] - means[i] for i, c in enumerate(users)])
    cov = rows.T @ rows / max(len(rows) - 1, 1)
    a = MAHALANOBIS_SHRINKAGE
    cov = (1 - a) * cov + a * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)
    return {"means": means.float(), "precision": torch.linalg.inv(cov).float()}


def mahalanobis_score(feats: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    d = feats.float()[:, None, :] - params["means"][None]  # [N, C, D]
    return -torch.einsum("ncd,de,nce->nc", d, params["precision"], d).min(dim=1).values


FEATURE_FIT = {"cosine": (cosine_parameters, cosine_score), "mahalanobis": (mahalanobis_parameters, mahalanobis_score)}


def served_features(feats: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
    """The features a score reads: mirror-averaged when the model averages mirrors."""
    return feats.float() if mirrored is None else (feats.float() + mirrored.float()) / 2


class OutOfDistribution(nn.Module):
    """A model's score and threshold. Travels as the classifier's `ood` submodule (tensors in the
    weights file under "ood.", the rest in the manifest's serving["ood"])."""

    def __init__(self, kind: str, threshold: float, classes: list[str], params: dict[str, torch.Tensor] | None = None,
                 details: dict | None = None):
        super().__init__()
        if kind not in MEASURED_KINDS:
            raise ValueError(f"unknown out-of-distribution score {kind!r}; known: {', '.join(KINDS)}")
        self.kind, self.threshold = kind, float(threshold)
        self.details = dict(details or {})
        self.register_buffer("users", user_class_index(classes), persistent=False)
        self.only_users = len(self.users) == len(classes)  # a Python bool: exported graphs branch on no data
        for name, value in (params or {}).items():
            self.register_buffer(name, value.float().contiguous())

    def config(self) -> dict:
        """What the manifest keeps of it (serving["ood"])."""
        return {"kind": self.kind, "threshold": self.threshold, "range": RANGES[self.kind], **self.details}

    @classmethod
    def from_manifest(cls, config: dict, classes: list[str], state: dict[str, torch.Tensor]) -> "OutOfDistribution":
        params = {k[len(OOD_PREFIX):]: v for k, v in state.items() if k.startswith(OOD_PREFIX)}
        details = {k: v for k, v in config.items() if k not in ("kind", "threshold", "range")}
        return cls(config["kind"], config["threshold"], classes, params, details)

    def score(self, logits: torch.Tensor, temperature: float, feats: torch.Tensor | None = None,
              mirrored: torch.Tensor | None = None) -> torch.Tensor:
        """[N] scores of served logits [N, classes] and the head's input features [N, D] (with their
        mirrors' when the model averages mirrors)."""
        if self.kind in FEATURE_FIT:
            params = {name: buffer for name, buffer in self.named_buffers() if name != "users"}
            return FEATURE_FIT[self.kind][1](served_features(feats, mirrored), params)
        users = None if self.only_users else self.users
        return logit_score(self.kind, logits, temperature, users)


def check_min_score(ood: OutOfDistribution | None, min_score: float | None, model_id: str) -> str | None:
    """Why `min_score` cannot be used with this model (None: it can)."""
    if min_score is None:
        return None
    if ood is None:
        return (f"model {model_id} has no out-of-distribution score (trained before Graft kept one, or a "
                "multi-label model), so min_score cannot apply; leave it out, or retrain the model")
    if not math.isfinite(min_score):
        return f"min_score must be a finite number, not {min_score}"
    bounds = RANGES[ood.kind]
    if bounds is not None and not bounds[0] <= min_score <= bounds[1]:
        return (f"min_score {min_score} is outside the range of this model's {ood.kind!r} score: allowed "
                f"{bounds[0]} to {bounds[1]} (the model's own threshold is {ood.threshold:.6g})")
    return None


# --- fitting on held-out predictions ---------------------------------------------------------------

def pass_threshold(scores: torch.Tensor, rate: float = TARGET_PASS_RATE) -> float:
    """A threshold that at least `rate` of `scores` reach (score >= threshold passes): the score at
    the cut, less a hair (`TIE_MARGIN`, relative) so that the same image scored again at /predict,
    by another order of float operations, still passes."""
    s = scores.double().sort().values
    drop = int(math.floor((1 - rate) * len(s) + 1e-9))  # how many may fall below
    cut = float(s[min(drop, len(s) - 1)])
    return cut - TIE_MARGIN * max(1.0, abs(cut))


def stratified_folds(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """A fold number per row, each class dealt round-robin in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    folds = torch.empty(len(y), dtype=torch.long)
    for c in y.unique().tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        folds[members] = torch.arange(len(members)) % k
    return folds


def fold_cosine_scores(fit_feats: torch.Tensor, fit_y: torch.Tensor, out_feats: torch.Tensor,
                       classes: list[str]) -> torch.Tensor:
    """"cosine" scores of a fold's held-out images under the fold's model: its features of them
    against the centre and class means of its features of the images it trained on."""
    users = [int(c) for c in user_class_index(classes) if bool((fit_y == c).any())]
    return cosine_score(out_feats, cosine_parameters(fit_feats, fit_y, users))


def held_out_feature_scores(kind: str, feats: torch.Tensor, y: torch.Tensor, users: list[int],
                            scored: torch.Tensor, fit_rows: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
    """Scores of the rows `scored` (positions into feats), each from statistics that never saw it:
    fitted on `fit_rows` when given (a val split), else out of fold over `scored` itself."""
    fit, score = FEATURE_FIT[kind]
    if fit_rows is not None:
        return score(feats[scored], fit(feats[fit_rows], y[fit_rows], users))
    sub_y = y[scored]
    smallest = min(int((sub_y == c).sum()) for c in users if bool((sub_y == c).any()))
    k = max(2, min(FEATURE_FOLDS, smallest))
    folds = stratified_folds(sub_y, k, seed)
    out = torch.empty(len(scored))
    for f in range(k):
        inside, outside = scored[folds != f], folds == f
        present = [c for c in users if bool((y[inside] == c).any())]
        out[outside] = score(feats[scored[outside]], fit(feats[inside], y[inside], present))
    return out


def fit_ood(held_out, classes: list[str], temperature: float, features: torch.Tensor | None = None,
            pooled_y: torch.Tensor | None = None, kind: str | None = None, seed: int = 0,
            rate: float = TARGET_PASS_RATE) -> OutOfDistribution | None:
    """The model's score and threshold from its held-out predictions (`contract.HeldOut`).

    `features`: the head's input features of every pooled labeled image (train, then val; [N, D],
    mirror-averaged as served) when the model's backbone is the frozen one those were computed
    with, and `pooled_y` their labels; None for a tuned backbone. `kind`: None picks "cosine"
    when features are given, else "energy". Returns None when there is nothing to fit on (fewer
    than two held-out images of user classes, or multi-label targets).
    """
    if held_out is None or held_out.y.dim() != 1:
        return None  # multi-label targets, or no held-out predictions
    users = [i for i, c in enumerate(classes) if c != NEGATIVE_LABEL]
    in_dist = torch.isin(held_out.y, torch.tensor(users))
    if int(in_dist.sum()) < 2:
        return None
    kind = kind or ("cosine" if features is not None else "energy")
    index = user_class_index(classes)
    rows = held_out.rows[in_dist]
    details = {"fitted_on": f"{held_out.predictions} predictions", "images": int(in_dist.sum()),
               "target_pass_rate": rate}
    params = None
    if kind in FEATURE_FIT:
        if features is None:
            raise ValueError(f"score {kind!r} needs the held-out images' features")
        pooled_y = pooled_y.long() if pooled_y is not None else _pooled_labels(held_out, len(features))
        fit_rows = None
        if held_out.predictions == "val":  # statistics from the rows that trained the model
            trained = torch.ones(len(features), dtype=torch.bool)
            trained[held_out.rows] = False
            trained &= torch.isin(pooled_y, torch.tensor(users))
            fit_rows = torch.nonzero(trained).flatten()
            fit_rows = fit_rows if len(fit_rows) else None
        if kind == "cosine" and getattr(held_out, "feature_scores", None) is not None:
            scores = held_out.feature_scores[in_dist]  # each by a fold's model that never trained on it
            details["scored_by"] = "each fold's own model"
        else:
            scores = held_out_feature_scores(kind, features, pooled_y, users, rows, fit_rows, seed)
        fitted = FEATURE_FIT[kind][0]
        if fit_rows is None:  # out of fold: the served statistics are those of all the rows
            params = fitted(features[rows], pooled_y[rows], users)
        else:
            params = fitted(features[fit_rows], pooled_y[fit_rows], users)
    else:
        scores = logit_score(kind, held_out.logits[in_dist], temperature,
                             index if len(index) < len(classes) else None)
    threshold = pass_threshold(scores, rate)
    details["held_out_pass_rate"] = round(float((scores >= threshold).double().mean()), 6)
    return OutOfDistribution(kind, threshold, classes, params, details)


def _pooled_labels(held_out, n: int) -> torch.Tensor:
    """Labels of the pooled rows that the held-out rows name (-1 elsewhere)."""
    y = torch.full((n,), -1, dtype=torch.long)
    y[held_out.rows] = held_out.y.long()
    return y


def negative_metrics(metrics: dict, classes: list[str]) -> dict:
    """The negative class taken out of the per-class table and the macro averages (reported apart
    under "negative"); accuracy and the confusion matrix still count its images."""
    if NEGATIVE_LABEL not in classes or "per_class" not in metrics:
        return metrics
    per_class = dict(metrics["per_class"])
    negative = per_class.pop(NEGATIVE_LABEL, None)
    present = [v for v in per_class.values() if v["support"] > 0]
    if present:
        metrics["macro_f1"] = round(sum(v["f1"] for v in present) / len(present), 6)
        metrics["balanced_accuracy"] = round(sum(v["recall"] for v in present) / len(present), 6)
    metrics["per_class"] = per_class
    metrics["negative"] = {"label": NEGATIVE_LABEL, **(negative or {}),
                           "note": "negative examples: answered unknown when this class is on top; not a user class"}
    return metrics
