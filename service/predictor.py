"""Serving trained models: a small LRU of loaded models, and the predict call."""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from service.errors import InvalidInput
from service.tables import Model
from workers.artifacts import LoadedModel, load_artifact
from workers.imaging import ImageRejected
from workers.preprocessing import decode_square, eval_crop, normalize


class ModelCache:
    """Keeps the most recently used models in memory; loads verify the artifact's sha256."""

    def __init__(self, data_dir: Path, capacity: int):
        self.data_dir = data_dir
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, row: Model) -> LoadedModel:
        with self._lock:
            if row.id in self._models:
                self._models.move_to_end(row.id)
                return self._models[row.id]
        loaded = load_artifact(self.data_dir / row.artifact_dir, row.sha256)
        with self._lock:
            self._models[row.id] = loaded
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)
        return loaded

    def __len__(self) -> int:
        return len(self._models)


def predict(model: LoadedModel, files: list[tuple[str, bytes]], top_k: int) -> list[dict]:
    """Calibrated probabilities for each file, in upload order, top_k sorted by score.

    The model's temperature (fitted on val after training) and mirror averaging (tta_flip) come
    from its manifest, so /predict scores are the ones its ECE was measured on.
    """
    pre = model.preprocessing
    squares = []
    for name, data in files:
        try:
            squares.append(decode_square(data, pre))
        except ImageRejected as exc:
            raise InvalidInput(f"file {name!r} is not a usable image: {exc}", filename=name) from None
    x = normalize(eval_crop(torch.stack(squares), pre), pre)
    probs = model.classifier.predict_proba(x)
    k = min(top_k, len(model.classes))
    scores, indices = probs.topk(k, dim=1)
    return [
        {"filename": name,
         "predictions": [{"label": model.classes[i], "score": round(float(s), 6)}
                         for s, i in zip(row_scores.tolist(), row_idx.tolist())]}
        for (name, _), row_scores, row_idx in zip(files, scores, indices)
    ]
