"""Calibration: expected calibration error, and temperature scaling (Guo et al. 2017).

A temperature T > 0 divides the logits before the softmax: it changes confidences, never the
predicted class, so accuracy is untouched while the negative log-likelihood on the set it is fitted
on can only go down (T = 1 is among the candidates).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

ECE_BINS = 15
_T_MIN, _T_MAX = 0.05, 20.0


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Top-1 ECE: the |accuracy - confidence| gap of `bins` equal-width confidence bins, weighted by size."""
    if len(y) == 0:
        return 0.0
    conf, pred = probs.float().max(dim=1)
    correct = (pred == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece)


def nll(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.float() / temperature, y))


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The T minimizing NLL of softmax(logits / T) on (logits, y); 1.0 when nothing beats it.

    When every example is classified right, NLL keeps falling as T -> 0, so the fit says nothing
    about how sharp to be: then T is kept >= 1 (only softening, never sharpening).

    NLL is convex in 1/T, so a bracketing search on log T is exact enough and has no learning
    rate to tune: a coarse grid, then golden-section refinement around the best point.
    """
    logits, y = logits.detach().float(), y.detach()
    if len(y) == 0:
        return 1.0
    grid = torch.logspace(torch.log10(torch.tensor(_T_MIN)), torch.log10(torch.tensor(_T_MAX)), 61)
    losses = [nll(logits, y, float(t)) for t in grid]
    i = min(range(len(grid)), key=losses.__getitem__)
    lo, hi = float(grid[max(i - 1, 0)].log()), float(grid[min(i + 1, len(grid) - 1)].log())
    ratio = (5 ** 0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(logits, y, float(torch.tensor(a).exp())), nll(logits, y, float(torch.tensor(b).exp()))
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(logits, y, float(torch.tensor(a).exp()))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(logits, y, float(torch.tensor(b).exp()))
    best = float(torch.tensor((lo + hi) / 2).exp())
    if bool((logits.argmax(1) == y).all()):
        best = max(best, 1.0)
    return best if nll(logits, y, best) < nll(logits, y, 1.0) else 1.0
