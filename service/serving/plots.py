"""A model's plots as PNG, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each figure is its own `Figure` on a `FigureCanvasAgg`, so nothing global is touched and drawing is
safe beside other threads. The data come from the model's metrics (history, confusion matrix) and
its held-out logits (workers/evaluation.py), calibrated with its temperature as /predict is.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before anything else of matplotlib: headless, whatever MPLBACKEND says

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import average_precision_score, precision_recall_curve  # noqa: E402

from workers.artifacts import calibrated_probabilities  # noqa: E402
from workers.calibration import ECE_BINS, expected_calibration_error  # noqa: E402

DPI = 100
MAX_PR_CLASSES = 12  # more curves than this are unreadable: the classes of lowest average precision are drawn
MAX_ANNOTATED_CLASSES = 25  # counts are written in the confusion matrix's cells up to this many classes


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def training_curves(history: list[dict]) -> bytes:
    """Train and val loss, and val accuracy, per epoch."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    loss_ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    marker = "o" if len(history) < 30 else None
    for key, colour in (("train_loss", "#c4321f"), ("val_loss", "#e59a3c")):
        points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
        if points:
            loss_ax.plot(*zip(*points), color=colour, marker=marker, label=key.replace("_", " "))
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    acc_ax = loss_ax.twinx()
    points = [(h["epoch"], h["val_accuracy"]) for h in history if h.get("val_accuracy") is not None]
    if points:
        acc_ax.plot(*zip(*points), color="#2f6fed", marker=marker, label="val accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_ylabel("val accuracy")
    if 0 < len(set(epochs)) <= 15:  # whole epochs on the axis, not 2.5
        loss_ax.set_xticks(sorted(set(epochs)))
    handles = loss_ax.get_legend_handles_labels()[0] + acc_ax.get_legend_handles_labels()[0]
    loss_ax.legend(handles=handles, loc="center right")
    loss_ax.set_title("Training curves")
    return _png(fig)


def confusion_matrix(cm: dict) -> bytes:
    """Counts, rows the true labels, columns the predicted ones; shaded by each row's share."""
    labels, matrix = cm["labels"], np.array(cm["matrix"], dtype=float)
    n = len(labels)
    side = min(16.0, max(5.0, 0.45 * n + 2.5))
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.add_subplot()
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(n)
    ax.set_xticks(ticks, labels if n <= 60 else [""] * n, rotation=90 if n > 6 else 0)
    ax.set_yticks(ticks, labels if n <= 60 else [""] * n)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
    ax.set_title(f"Confusion matrix ({int(matrix.sum())} held-out images)")
    return _png(fig)


def reliability(logits: torch.Tensor, labels: torch.Tensor, temperature: float, predictions: str) -> bytes:
    """Accuracy against confidence in ECE_BINS bins, before calibration (T = 1) and after (the model's T)."""
    fig = Figure(figsize=(10, 4.8), layout="constrained")
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for k, (title, t) in enumerate((("before calibration", 1.0), (f"after (temperature {temperature:.3g})", temperature))):
        probs = calibrated_probabilities(logits.float(), t)
        conf, pred = probs.max(1)
        correct = (pred == labels).float().numpy()
        conf = conf.numpy()
        ax = fig.add_subplot(1, 2, k + 1)
        accs, counts = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            inside = (conf > lo) & (conf <= hi)
            counts.append(int(inside.sum()))
            accs.append(float(correct[inside].mean()) if inside.any() else 0.0)
        centres = (edges[:-1] + edges[1:]) / 2
        ax.bar(centres, accs, width=1 / ECE_BINS, edgecolor="#1f3b73", color="#2f6fed", alpha=0.8, label="accuracy")
        ax.plot([0, 1], [0, 1], "--", color="#667085", label="perfectly calibrated")
        ece = expected_calibration_error(probs, labels)
        ax.set_title(f"{title}: ECE {ece:.3f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left")
    fig.suptitle(f"Reliability on {len(labels)} held-out images ({predictions} predictions)")
    return _png(fig)


def precision_recall(logits: torch.Tensor, labels: torch.Tensor, temperature: float, classes: list[str]) -> bytes:
    """One-vs-rest precision-recall curve of each class (the weakest MAX_PR_CLASSES by average precision)."""
    probs = calibrated_probabilities(logits.float(), temperature).double().numpy()
    y = labels.numpy()
    present = [c for c in range(len(classes)) if (y == c).any()]
    ap = {c: average_precision_score(y == c, probs[:, c]) for c in present}
    shown = sorted(present, key=lambda c: ap[c])[:MAX_PR_CLASSES]
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.add_subplot()
    for c in sorted(shown):
        precision, recall, _ = precision_recall_curve(y == c, probs[:, c])
        ax.step(recall, precision, where="post", label=f"{classes[c]} (AP {ap[c]:.3f})")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    note = "" if len(shown) == len(present) else f", the {len(shown)} of lowest AP of {len(present)}"
    ax.set_title(f"Precision-recall per class ({len(labels)} held-out images{note})")
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)
