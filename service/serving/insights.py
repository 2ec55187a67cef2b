"""What the API shows of a model beyond its numbers: the held-out predictions per image (the images
it gets wrong), its plots, and the thumbnails of a dataset's images.

The held-out predictions are the files workers/evaluation.py writes with the artifact; they are
read through the object store (service/store/objects.py) and kept parsed for the few models
looked at last. Plots are drawn on first request (service/serving/plots.py), stored beside the
artifact (`<artifact dir>/plots/<name>.png`, committed like any stored file) and read from there
afterwards, on any API process.
"""
from __future__ import annotations

import io
import os
import threading
import uuid
from collections import OrderedDict

from PIL import Image

from service.errors import InvalidInput, NotFound
from service.settings import Settings
from service.store.objects import store_for
from service.store.tables import Model
from workers.evaluation import EVALUATION_FILE, LOGITS_FILE, VALIDATION, read_evaluation, read_logits
from workers.imaging import ImageRejected, decode_image

SORTS = ("loss", "probability", "dataset")
PLOTS = ("training_curves", "confusion_matrix", "reliability", "precision_recall")
THUMBNAIL_SIDE = 160
PARSED_KEPT = 8  # models whose held-out predictions stay parsed in this process


def plot_names(metrics: dict) -> list[str]:
    """The plots a model has (those without their data are left out: a one-fit model has no curve)."""
    names = []
    if any("val_loss" in h or "train_loss" in h for h in metrics.get("history") or []):
        names.append("training_curves")
    if metrics.get("confusion_matrix"):
        names.append("confusion_matrix")
    if metrics.get("held_out"):
        names += ["reliability", "precision_recall"]
    return names


class Insights:
    """One per API process (app.state.insights)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._parsed: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._drawing = threading.Lock()  # matplotlib's Agg canvases are independent; one drawing at a time is plenty

    # -- held-out predictions ----------------------------------------------------------------------
    def evaluation(self, row: Model) -> dict:
        """The model's held-out predictions document (workers/evaluation.py); 404 when it has none."""
        with self._lock:
            if row.id in self._parsed:
                self._parsed.move_to_end(row.id)
                return self._parsed[row.id]
        if not (row.metrics or {}).get("held_out"):
            raise NotFound(f"model {row.id} keeps no held-out predictions: it was trained before Graft kept "
                           "them; train it again to see them")
        document = read_evaluation(store_for(self.settings).fetch(f"{row.artifact_dir}/{EVALUATION_FILE}").read_bytes())
        with self._lock:
            self._parsed[row.id] = document
            while len(self._parsed) > PARSED_KEPT:
                self._parsed.popitem(last=False)
        return document

    def rows(self, row: Model, *, subset: str = VALIDATION, true_label: str | None = None,
             predicted_label: str | None = None, correct: bool | None = None, sort: str = "loss",
             order: str = "desc") -> tuple[dict, list[dict]]:
        """The document and its rows of one subset, filtered (one confusion-matrix cell: a true and a
        predicted label) and sorted; "dataset" keeps the dataset's order."""
        document = self.evaluation(row)
        for name, label in (("true", true_label), ("predicted", predicted_label)):
            if label is not None and label not in document["classes"]:
                raise InvalidInput(f"{name}={label[:100]!r} is not a class of model {row.id}; its classes are "
                                   + ", ".join(document["classes"][:50]))
        rows = [r for r in document["rows"] if r["subset"] == subset
                and (true_label is None or r["true_label"] == true_label)
                and (predicted_label is None or r["predicted_label"] == predicted_label)
                and (correct is None or r["correct"] == correct)]
        if sort != "dataset":
            rows = sorted(rows, key=lambda r: r[sort], reverse=order == "desc")
        elif order == "desc":
            rows = rows[::-1]
        return document, rows

    # -- plots -------------------------------------------------------------------------------------
    def plot(self, row: Model, name: str) -> bytes:
        """The plot's PNG, drawn once per model and kept with its artifact."""
        if name not in PLOTS:
            raise NotFound(f"no plot named {name[:100]!r}; plots: {', '.join(PLOTS)}")
        if name not in plot_names(row.metrics or {}):
            raise NotFound(f"model {row.id} has no {name} plot: " + _why_not(name))
        storage = store_for(self.settings)
        key = f"{row.artifact_dir}/plots/{name}.png"
        try:
            return storage.fetch(key).read_bytes()
        except FileNotFoundError:
            pass
        png = self._draw(row, name)
        target = storage.local(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
        tmp.write_bytes(png)
        os.replace(tmp, target)  # two processes drawing at once write the same picture
        storage.commit(key)
        return png

    def _draw(self, row: Model, name: str) -> bytes:
        from service.serving import plots  # matplotlib: imported on the first plot, not at start-up

        metrics = row.metrics or {}
        with self._drawing:
            if name == "training_curves":
                return plots.training_curves(metrics["history"])
            if name == "confusion_matrix":
                return plots.confusion_matrix(metrics["confusion_matrix"])
            document = self.evaluation(row)
            logits, labels = read_logits(
                store_for(self.settings).fetch(f"{row.artifact_dir}/{LOGITS_FILE}").read_bytes())
            if name == "reliability":
                return plots.reliability(logits, labels, document["temperature"], document["predictions"])
            return plots.precision_recall(logits, labels, document["temperature"], document["classes"])


def _why_not(name: str) -> str:
    if name == "training_curves":
        return "it was trained by one fit (a logistic-regression head, or auto's cross-validated winner), not epochs"
    return "it was trained before Graft kept held-out predictions; train it again"


def thumbnail(data: bytes, side: int) -> bytes:
    """A JPEG of at most side x side pixels (aspect kept), decoded as training decodes the image."""
    try:
        image = decode_image(data, draft_size=side)
    except ImageRejected as exc:  # stored images passed these checks; a damaged blob still says why
        raise InvalidInput(f"the stored image cannot be decoded: {exc}") from None
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85, optimize=False)
    return buf.getvalue()

