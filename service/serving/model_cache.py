"""Serving trained models: a small LRU of loaded models, and the predict call."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from torch import nn

from service.errors import InvalidInput
from service.serving.engine import InferenceEngine
from service.settings import Settings
from service.store.tables import Model
from service.store.objects import store_for
from workers.artifacts import MANIFEST_FILE, WEIGHTS_FILE, LoadedModel, load_artifact, weight_bytes
from workers.imaging import ImageRejected
from workers.ood import NEGATIVE_LABEL
from service.serving.multilabel import multi_label_answer
from workers.preprocessing import decode_square, eval_crop


class ModelCache:
    """Keeps the most recently used models in memory, up to `max_bytes` of weights (LRU).

    A model costs the bytes of its own parameters and buffers; a backbone shared by several
    models (format-2 linear probes) is counted once while any cached model uses it, and so is
    what `copy_bytes` says is held for it elsewhere (the inference engine's frozen CPU copy). The
    model just loaded always stays, even alone over the budget. Loads verify the artifact's sha256.
    """

    def __init__(self, settings: Settings, max_bytes: int, allow_downloads: bool = False,
                 copy_bytes: Callable[[nn.Module], int] | None = None):
        self.settings = settings
        self.max_bytes = max_bytes
        self.allow_downloads = allow_downloads
        self.copy_bytes = copy_bytes or (lambda backbone: 0)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._own_bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, row: Model) -> LoadedModel:
        with self._lock:
            if row.id in self._models:
                self._models.move_to_end(row.id)
                return self._models[row.id]
        folder = store_for(self.settings).fetch_files(row.artifact_dir, (WEIGHTS_FILE, MANIFEST_FILE))
        loaded = load_artifact(folder, row.sha256, allow_downloads=self.allow_downloads)
        own = loaded.own_bytes  # outside the lock: walks every tensor
        with self._lock:
            if row.id in self._models:  # another request loaded it meanwhile: keep one copy
                self._models.move_to_end(row.id)
                return self._models[row.id]
            self._models[row.id], self._own_bytes[row.id] = loaded, own
            while len(self._models) > 1 and self._bytes_locked() > self.max_bytes:
                evicted, _ = self._models.popitem(last=False)
                del self._own_bytes[evicted]
        return loaded

    def _bytes_locked(self) -> int:
        shared = {id(m.shared_backbone): m.shared_backbone for m in self._models.values()
                  if m.shared_backbone is not None}
        backbones = {id(m.classifier.features): m.classifier.features for m in self._models.values()}
        return (sum(self._own_bytes.values()) + sum(weight_bytes(b) for b in shared.values())
                + sum(self.copy_bytes(b) for b in backbones.values()))

    @property
    def total_bytes(self) -> int:
        """Weight bytes of the cached models, each shared backbone once (for /metrics)."""
        with self._lock:
            return self._bytes_locked()

    def ids(self) -> list[str]:
        """The cached models' ids, least recently used first."""
        with self._lock:
            return list(self._models)

    def __len__(self) -> int:
        return len(self._models)


def predict(engine: InferenceEngine, model: LoadedModel, files: list[tuple[str, bytes]], top_k: int,
            min_score: float | None = None) -> list[dict]:
    """Calibrated probabilities for each file, in upload order, top_k sorted by score.

    Decoding runs on the caller's thread (several files: on the engine's decode threads), the
    forward on the engine's thread, so torch always runs on one thread. The model's temperature
    (fitted on val after training) and mirror averaging (tta_flip) come from its manifest, so
    /predict scores are the ones its ECE was measured on.

    Issue 17: `label` is the top class, or None with `unknown` true when the image scores below
    the model's out-of-distribution threshold (`min_score` instead, when given: the caller checked
    it with workers.ood.check_min_score) or when its top class is the negative class. A model
    without a stored score (made before it) never answers unknown.
    """
    pre = model.preprocessing

    def crop(item: tuple[str, bytes]):
        name, data = item
        try:
            return eval_crop(decode_square(data, pre), pre)  # a view: the engine copies it once
        except ImageRejected as exc:
            raise InvalidInput(f"file {name!r} is not a usable image: {exc}", filename=name) from None

    probs, ood_scores = engine.predict_scored(model, files, decode=crop)
    k = min(top_k, len(model.classes))
    scores, indices = probs.topk(k, dim=1)
    return [
        {"filename": name, **unknown_answer(model, int(row_idx[0]), ood_scores[j] if ood_scores is not None else None,
                                            min_score),
         "predictions": [{"label": model.classes[i], "score": round(float(s), 6)}
                         for s, i in zip(row_scores.tolist(), row_idx.tolist())],
         **multi_label_answer(model, probs[j])}  # issue 17: labels over their thresholds, all scores
        for j, ((name, _), row_scores, row_idx) in enumerate(zip(files, scores, indices))
    ]


def unknown_answer(model: LoadedModel, top: int, score, min_score: float | None) -> dict:
    """`label`, `unknown` and `ood` of one image's answer (issue 17)."""
    ood = getattr(model.classifier, "ood", None)
    negative = model.classes[top] == NEGATIVE_LABEL
    entry = None
    below = False
    if ood is not None and score is not None:
        threshold = ood.threshold if min_score is None else float(min_score)
        below = float(score) < threshold
        entry = {"kind": ood.kind, "score": round(float(score), 6), "threshold": round(threshold, 6)}
    unknown = negative or below
    return {"label": None if unknown else model.classes[top], "unknown": unknown, "ood": entry}
