"""Multinomial logistic regression on frozen features, fitted by L-BFGS: the classic strong head.

Full-batch L2-regularized softmax regression on standardized features (Kornblith et al. 2019, "Do
better ImageNet models transfer better?") is what a competent user fits on frozen features, and
usually beats a head trained by mini-batch Adam for a fixed number of epochs: it has one knob (the
L2 strength), no learning rate or epochs to tune, and it is deterministic. The fit is
scikit-learn's `LogisticRegression` (lbfgs), the well-kept library made for exactly this; the
result is folded back into the Classifier's `nn.Linear` head (standardization included), so the
artifact and /predict stay pure torch.

`C` is scikit-learn's: the loss is C * sum of the per-image log losses + |W|^2 / 2, so a larger C
regularizes less (and, for a fixed C, more images regularize relatively less).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch import nn

# The grid auto searches, strongest regularization first (warm starts go along it).
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MAX_ITER = 500
TOL = 1e-4


@dataclass
class LinearMap:
    """logits = x @ weight.T + bias, on raw (unstandardized) features."""

    weight: torch.Tensor  # [classes, features]
    bias: torch.Tensor  # [classes]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight.T + self.bias

    def load_into(self, head: nn.Linear) -> None:
        with torch.no_grad():
            head.weight.copy_(self.weight.to(head.weight.dtype))
            head.bias.copy_(self.bias.to(head.bias.dtype))


def standardized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x as float64 with zero mean and unit variance per feature, and that mean and std.

    In place on one float64 copy: the fit needs float64 (scikit-learn's L-BFGS converts to it), and
    building z as (x64 - mean) / std held three N x D float64 arrays at once — at 20,000 images
    and their mirrors, 1 GB more at the peak of an `auto` job."""
    z = x.detach().to("cpu", torch.float64, copy=True)
    mean = z.mean(0)
    z -= mean
    std = torch.linalg.vector_norm(z, dim=0) / math.sqrt(max(len(z), 1))  # population std, no N x D temporary
    # A feature constant over the training set carries nothing: scale 1 keeps it harmless.
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    z /= std
    return z, mean, std


class LogisticPath:
    """Fits along a grid of C on one training set, each fit warm-started from the previous one
    (a smaller C's solution is a good start for the next: 2-3x fewer iterations)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, balanced: bool = False,
                 sample_weight: torch.Tensor | None = None):
        z, mean, std = standardized(x)
        self.z, self.mean, self.std = z.numpy(), mean.numpy(), std.numpy()
        self.y = y.detach().cpu().numpy()
        # Per-image weights (pseudo-labels weigh less than labels: workers/training/semi.py).
        self.sample_weight = None if sample_weight is None else sample_weight.detach().double().cpu().numpy()
        self.num_classes = num_classes
        self.model = LogisticRegression(C=1.0, solver="lbfgs", max_iter=MAX_ITER, tol=TOL, warm_start=True,
                                        class_weight="balanced" if balanced else None)

    def fit(self, c: float) -> LinearMap:
        self.model.set_params(C=c)
        # One BLAS thread: these matrices are small, and two threads on two busy cores ran 7-10x
        # slower (0.35 s against 2.6 s for a fit on hymenoptera's 490 rows, machine loaded).
        with warnings.catch_warnings(), threadpool_limits(1):
            # Not converged to 1e-4 after MAX_ITER steps changes no prediction worth a warning in a job log.
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(self.z, self.y, sample_weight=self.sample_weight)
        return self._linear_map()

    def _linear_map(self) -> LinearMap:
        """The fitted model as logits over all classes on raw features: standardization folded in,
        and scikit-learn's one-column binary model made a two-logit softmax with the same odds."""
        coef, intercept = self.model.coef_, self.model.intercept_
        present = self.model.classes_
        if len(present) == 2 and coef.shape[0] == 1:
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        w = coef / self.std
        b = intercept - w @ self.mean
        # A class absent from this training set (a CV fold of a tiny class) is never predicted.
        weight = np.zeros((self.num_classes, w.shape[1]))
        bias = np.full(self.num_classes, -50.0)
        weight[present], bias[present] = w, b
        return LinearMap(torch.from_numpy(weight), torch.from_numpy(bias))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float, balanced: bool = False) -> LinearMap:
    return LogisticPath(x, y, num_classes, balanced).fit(c)


def training_set(train_f: torch.Tensor, train_y: torch.Tensor, mirror_f: torch.Tensor | None) -> tuple:
    """The images' features, and their mirrors' with the same labels when given (augmentation "light")."""
    if mirror_f is None:
        return train_f, train_y
    return torch.cat([train_f, mirror_f]), torch.cat([train_y, train_y])


def head_logits(fit: LinearMap, feats: torch.Tensor, mirror_feats: torch.Tensor | None) -> torch.Tensor:
    """float32 logits, mirror-averaged when `mirror_feats` is given (tta_flip): as /predict computes them."""
    logits = fit.logits(feats)
    if mirror_feats is not None:
        logits = (logits + fit.logits(mirror_feats)) / 2
    return logits.float()
