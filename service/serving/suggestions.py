"""Active learning (issue 16): which of a dataset's unlabeled images to label next, each with the
model's guess as a pre-label.

The model's backbone features of every unlabeled image (and of its mirror, for a model that
averages mirrors) are computed once by the inference engine and kept in this process, by the
backbone's identity, crop and image; so is the model's head, so asking again, after labeling a
few or with another model on the same backbone, costs the head only (1,000 images in well under
a second). Strategies:

- margin: the smallest gap between the two most probable classes (calibrated) first;
- entropy: the highest entropy of the calibrated probabilities first;
- diverse: k-center greedy on the features (cosine distance), over the most uncertain images by
  margin (DIVERSE_POOL times k of them), starting from the most uncertain: each next image is
  the one farthest from those already chosen, so the k are not near-copies of each other. An
  image whose perceptual hash is within the report's near-duplicate distance of one already
  chosen is skipped while any other image is left (outside the uncertain pool if need be).

A multi-label model's uncertainty is per label: margin is the smallest |2p - 1| over its labels,
entropy the sum of the labels' binary entropies.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from service.datasets.report import NEAR_DUPLICATE_BITS
from workers.artifacts import LoadedModel
from workers.imaging import ImageRejected
from workers.preprocessing import decode_square, eval_crop

STRATEGIES = ("margin", "entropy", "diverse")
DIVERSE_POOL = 5  # diverse: k-center over the DIVERSE_POOL * k most uncertain images (at least 50)
ENGINE_CHUNK = 32  # images per request to the engine (bounded memory: 32 normalized crops and mirrors)
KEPT_BYTES = 256 * 2**20  # features kept per API process (Lite0: ~10 KB an image with its mirror)


@dataclass
class Candidate:
    sha256: str
    original_name: str
    phash: str | None


class Suggestions:
    """One per API process (app.state.suggestions)."""

    def __init__(self, max_bytes: int = KEPT_BYTES):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def backbone_key(loaded: LoadedModel, model_sha256: str) -> tuple:
        """What the features depend on: the backbone's weights (a linear probe's pretrained backbone is
        shared by every model on it; a fine-tuned one is the model's own), the crop, the mirrors."""
        weights = loaded.manifest.get("backbone_weights") or {}
        identity = weights.get("sha256") if weights.get("source") == "pretrained" else model_sha256
        pre = loaded.preprocessing
        return (identity, pre.resize_size, pre.input_size, tuple(pre.mean), tuple(pre.std),
                bool(loaded.classifier.tta_flip))

    def features(self, engine, loaded: LoadedModel, model_sha256: str, shas: list[str],
                 read: Callable[[str], bytes]) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
        """[N, D] features (mirror-averaged input for the head stays separate: [N, D] or None) and
        whether each image could be decoded (a stored image that no longer decodes is left out)."""
        key = self.backbone_key(loaded, model_sha256)
        with self._lock:
            missing = [sha for sha in dict.fromkeys(shas) if (key, sha) not in self._kept]
        pre = loaded.preprocessing
        broken: set[str] = set()

        def crop(sha: str) -> torch.Tensor:
            try:
                return eval_crop(decode_square(read(sha), pre), pre)
            except (ImageRejected, FileNotFoundError):
                broken.add(sha)
                return torch.zeros((3, pre.input_size, pre.input_size), dtype=torch.uint8)

        for start in range(0, len(missing), ENGINE_CHUNK):
            chunk = missing[start:start + ENGINE_CHUNK]
            feats, mirrored = engine.features(loaded, chunk, decode=crop)
            with self._lock:
                for i, sha in enumerate(chunk):
                    if sha in broken:  # not kept: it is left out, this time and the next
                        continue
                    entry = (feats[i].clone(), mirrored[i].clone() if mirrored is not None else None)
                    self._put((key, sha), entry)
        with self._lock:
            entries = [self._kept.get((key, sha)) for sha in shas]
            for sha in shas:
                if (key, sha) in self._kept:
                    self._kept.move_to_end((key, sha))
        ok = [entry is not None and sha not in broken for sha, entry in zip(shas, entries)]
        dim = next((e[0].shape[0] for e in entries if e is not None), 0)
        feats = torch.zeros(0, dim)
        if shas:
            feats = torch.stack([e[0] if e is not None else torch.zeros(dim) for e in entries])
        mirrored = None
        if loaded.classifier.tta_flip and shas:
            mirrored = torch.stack([e[1] if e is not None and e[1] is not None else torch.zeros(dim) for e in entries])
        return feats, mirrored, ok

    def _put(self, key: tuple, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        if key in self._kept:
            return
        self._kept[key] = entry
        self._bytes += sum(t.nbytes for t in entry if t is not None)
        while len(self._kept) > 1 and self._bytes > self.max_bytes:
            _, old = self._kept.popitem(last=False)
            self._bytes -= sum(t.nbytes for t in old if t is not None)


# -- ranking (pure functions of probabilities, features and hashes) --------------------------------

def uncertainty(probs: torch.Tensor, multi_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(margin, entropy) per image: a small margin and a large entropy are uncertain."""
    p = probs.double().clamp(1e-12, 1.0)
    if multi_label:
        margin = (2 * probs.double() - 1).abs().min(1).values
        q = (1 - probs.double()).clamp(1e-12, 1.0)
        entropy = -(p * p.log() + q * q.log()).sum(1)
        return margin, entropy
    top2 = probs.double().topk(min(2, probs.shape[1]), dim=1).values
    margin = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    entropy = -(p * p.log()).sum(1)
    return margin, entropy


def rank(strategy: str, probs: torch.Tensor, feats: torch.Tensor, phashes: list[str | None], k: int,
         multi_label: bool = False) -> list[int]:
    """The positions of the k images to label first, in order."""
    margin, entropy = uncertainty(probs, multi_label)
    n = len(probs)
    if strategy == "margin":
        order = sorted(range(n), key=lambda i: (float(margin[i]), i))
        return order[:k]
    if strategy == "entropy":
        order = sorted(range(n), key=lambda i: (-float(entropy[i]), i))
        return order[:k]
    if strategy != "diverse":
        raise ValueError(f"unknown strategy {strategy!r}")
    return diverse(margin, feats, phashes, k)


def diverse(margin: torch.Tensor, feats: torch.Tensor, phashes: list[str | None], k: int) -> list[int]:
    """k-center greedy over the most uncertain images, skipping perceptual near-duplicates of those
    already chosen while any other image is left (see the module docstring)."""
    n = len(margin)
    k = min(k, n)
    if not k:
        return []
    by_margin = np.array(sorted(range(n), key=lambda i: (float(margin[i]), i)))
    uncertain_rank = np.empty(n, dtype=np.int64)
    uncertain_rank[by_margin] = np.arange(n)
    in_pool = uncertain_rank < max(DIVERSE_POOL * k, 50)
    z = torch.nn.functional.normalize(feats.double(), dim=1).numpy() if len(feats) else np.zeros((n, 1))
    hashes = np.array([int(h, 16) if h else 0 for h in phashes], dtype=np.uint64)
    has_hash = np.array([bool(h) for h in phashes])
    chosen = np.zeros(n, dtype=bool)
    blocked = np.zeros(n, dtype=bool)  # near-duplicates of an image already chosen
    nearest = np.full(n, np.inf)  # cosine distance to the nearest chosen image
    out: list[int] = []
    while len(out) < k:
        for allowed in (in_pool & ~chosen & ~blocked, ~chosen & ~blocked, ~chosen):
            if allowed.any():
                break
        candidates = np.flatnonzero(allowed)
        if not out:  # the most uncertain first
            pick = int(candidates[np.argmin(uncertain_rank[candidates])])
        else:  # the farthest from every chosen image; ties to the more uncertain
            far = nearest[candidates]
            best = candidates[far == far.max()]
            pick = int(best[np.argmin(uncertain_rank[best])])
        out.append(pick)
        chosen[pick] = True
        nearest = np.minimum(nearest, 1.0 - z @ z[pick])
        if has_hash[pick]:
            blocked |= has_hash & (np.bitwise_count(hashes ^ hashes[pick]) <= NEAR_DUPLICATE_BITS)
    return out


def suggest(engine, suggestions: Suggestions, loaded: LoadedModel, model_sha256: str, candidates: list[Candidate],
            read: Callable[[str], bytes], strategy: str, k: int, top: int = 3) -> dict:
    """The k suggestions, each with the model's top classes as its pre-label."""
    started = time.perf_counter()
    shas = [c.sha256 for c in candidates]
    feats, mirrored, ok = suggestions.features(engine, loaded, model_sha256, shas, read)
    usable = [i for i, good in enumerate(ok) if good]
    classifier = loaded.classifier
    multi_label = bool(getattr(classifier, "multi_label", False))
    probs = torch.zeros(0, len(loaded.classes))
    if usable:
        idx = torch.tensor(usable)
        with torch.inference_mode():
            head = next(classifier.head.parameters())
            f = feats[idx].to(head.device, head.dtype)
            logits = classifier.head_logits(f).float()
            mirror_logits = classifier.head_logits(mirrored[idx].to(head.device, head.dtype)).float() \
                if mirrored is not None else None
            probs = classifier.serve(logits, mirror_logits)[1].float().cpu()
    order = rank(strategy, probs, feats[torch.tensor(usable, dtype=torch.long)] if usable else feats[:0],
                 [candidates[i].phash for i in usable], k, multi_label)
    margin, entropy = uncertainty(probs, multi_label) if usable else (torch.zeros(0), torch.zeros(0))
    rows = []
    for position, j in enumerate(order, start=1):
        c = candidates[usable[j]]
        scores, labels = probs[j].topk(min(top, probs.shape[1]))
        rows.append({"rank": position, "image_id": c.sha256, "original_name": c.original_name,
                     "predicted_label": loaded.classes[int(labels[0])], "score": round(float(scores[0]), 6),
                     "margin": round(float(margin[j]), 6), "entropy": round(float(entropy[j]), 6),
                     "predictions": [{"label": loaded.classes[int(i)], "score": round(float(s), 6)}
                                     for s, i in zip(scores.tolist(), labels.tolist())]})
    return {"unlabeled_images": len(candidates), "scored_images": len(usable), "suggestions": rows,
            "seconds": round(time.perf_counter() - started, 3)}
