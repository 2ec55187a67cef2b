"""Choosing a recipe without wasting images, and an accuracy estimate that survives the choice.

- `stratified_folds`: each image's fold, every class spread evenly over the folds, the same for
  the same labels and seed.
- `select`: the candidate with the best out-of-fold accuracy, ties to the lower out-of-fold NLL.
- `bbc_estimate`: BBC-CV (Tsamardinos, Greasidou & Borboudakis 2018, "Bootstrapping the
  out-of-sample predictions for efficient and accurate cross-validation", Machine Learning 107).
  The winner's own out-of-fold score is optimistic: it was picked for being high. BBC-CV
  bootstraps the images; on each bootstrap sample it repeats the selection on the in-bag images
  and scores the candidate it picks on the out-of-bag ones, which took no part in that choice. The
  mean of those scores is the estimate; their 2.5th and 97.5th percentiles the 95% interval (a
  little conservative: each out-of-bag set is about 37% of the images). Every candidate's
  predictions are made once, so the correction costs no training.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

MAX_FOLDS = 5
BOOTSTRAPS = 1000


def fold_count(y: torch.Tensor, max_folds: int = MAX_FOLDS) -> int:
    """k = min(max_folds, the smallest class's count), at least 2 (a class of one image then sits in
    one fold only, and its training folds never see it)."""
    counts = torch.bincount(y.cpu())
    smallest = int(counts[counts > 0].min()) if len(y) else 0
    return max(2, min(max_folds, smallest))


def stratified_folds(y: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Fold index (0..k-1) of each image: within each class, a seeded shuffle dealt round-robin, the
    deal of each class starting where the previous one's ended, so fold sizes differ by at most one."""
    y = y.cpu()
    gen = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    start = 0
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        fold[members] = (torch.arange(len(members)) + start) % k
        start = (start + len(members)) % k
    return fold


def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, -NLL): larger is better."""
    logits, y = logits.float().cpu(), y.cpu()
    return float((logits.argmax(1) == y).float().mean()), -float(F.cross_entropy(logits, y))


def select(oof_logits: list[torch.Tensor], y: torch.Tensor) -> int:
    """Index of the candidate with the best accuracy, ties to the lower NLL, then to the first."""
    scores = [score(logits, y) for logits in oof_logits]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def bbc_estimate(oof_logits: list[torch.Tensor], y: torch.Tensor, seed: int,
                 bootstraps: int = BOOTSTRAPS) -> dict:
    """BBC-CV accuracy of "pick the best of these candidates" (see the module docstring): the
    estimate, its 95% interval and the spread, from each candidate's out-of-sample logits."""
    y = y.cpu()
    n = len(y)
    correct = torch.stack([(logits.float().cpu().argmax(1) == y) for logits in oof_logits]).float()  # [M, N]
    # Ties in in-bag accuracy go to the lower in-bag NLL, as in `select`.
    nll = torch.stack([F.cross_entropy(logits.float().cpu(), y, reduction="none") for logits in oof_logits])
    gen = torch.Generator().manual_seed(seed)
    # Every bootstrap at once: how often each image is drawn [B, N]; out of bag where never.
    draws = torch.randint(n, (bootstraps, n), generator=gen)
    counts = torch.zeros(bootstraps, n, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(bootstraps, n, dtype=torch.float64))
    out_of_bag = counts == 0
    keep = out_of_bag.any(1)
    counts, out_of_bag = counts[keep], out_of_bag[keep]
    # In-bag accuracy differs by multiples of 1/n; the NLL term (scaled far below that) breaks
    # ties toward the lower in-bag NLL, and argmax's first maximum toward the earlier candidate.
    in_bag = (counts @ correct.double().T - 1e-9 * (counts @ nll.double().T)) / n  # [B, M]
    best = in_bag.argmax(1)
    s = (correct.double()[best] * out_of_bag).sum(1) / out_of_bag.sum(1)
    lo, hi = torch.quantile(s, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"accuracy": round(float(s.mean()), 6), "ci95": [round(lo, 6), round(hi, 6)],
            "method": "BBC-CV (bootstrap bias-corrected), out-of-sample predictions of every candidate",
            "bootstraps": len(s), "images": n}
