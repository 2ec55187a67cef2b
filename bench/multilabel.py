"""Multi-label on real photos (issue 17): Graft's multi-label `auto` against one-vs-rest scikit-learn
LogisticRegression on the same frozen features, in the same run.

    python bench/multilabel.py [--train 240 --test 120 --json /tmp/multilabel.json]

The set: mosaics of 1-3 photos of different classes side by side, each photo centre-cropped to a
vertical strip of one square (tests/support/multilabel.py), drawn from ants, bees (hymenoptera)
and basophil, eosinophil, lymphocyte, neutrophil (bloodcells); an image's labels are the union of
its photos' classes. Train mosaics are made of train/ photos, test mosaics of val/ photos, each
photo used once: no photo is in both. Graft: strategy auto as a job runs it (one-vs-rest logistic
heads over its C grid on Lite0 features of each image and its mirror, cross-validated over the
labeled images, per-label Platt calibration and thresholds fitted out of fold, refitted on all),
scored on the test mosaics through the model's own predict arithmetic (Classifier.predict_proba).
Baseline: scikit-learn LogisticRegression per label (OneVsRestClassifier) on standardized frozen
features of the same backbone and eval crop, trained on each image and its mirror, C in {0.1, 0.3,
1, 3, 10} by 5-fold CV on macro mAP, refitted on all and scored on the test mosaics; its labels are
"probability >= 0.5" (what a user of predict gets without tuning).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.multilabel import draw_mosaics  # noqa: E402
from workers.backbones import DEFAULT_BACKBONE, get_backbone  # noqa: E402
from workers.config import TrainConfig  # noqa: E402
from workers.data import rarest_labels, stratified_split  # noqa: E402
from workers.metrics import multilabel_metrics  # noqa: E402
from workers.preprocessing import decode_square, eval_crop  # noqa: E402
from workers.training import PreparedData, predicted_probabilities, train  # noqa: E402
from workers.training.contract import NullControl  # noqa: E402
from workers.training.parts import features_of  # noqa: E402

CLASSES = {"ants": ("hymenoptera", "ants"), "bees": ("hymenoptera", "bees"),
           "basophil": ("bloodcells", "basophil"), "eosinophil": ("bloodcells", "eosinophil"),
           "lymphocyte": ("bloodcells", "lymphocyte"), "neutrophil": ("bloodcells", "neutrophil")}
BASELINE_C = (0.1, 0.3, 1.0, 3.0, 10.0)


def decoded(items, labels, pre) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([decode_square(data, pre) for data, _ in items])
    y = torch.tensor([[1.0 if c in names else 0.0 for c in labels] for _, names in items])
    return x, y


def baseline(train_x, train_y, test_x, test_y, pre, labels) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.model_selection import KFold
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    backbone = get_backbone(DEFAULT_BACKBONE).build_features(pretrained=True).eval()
    control, cpu = NullControl(), torch.device("cpu")

    def feats(x, mirrored=False):
        return features_of(backbone, eval_crop(x, pre), pre, cpu, control, mirrored=mirrored).numpy()

    f, fm, ft = feats(train_x), feats(train_x, True), feats(test_x)
    y, yt = train_y.numpy(), test_y.numpy()

    def model(c):
        return OneVsRestClassifier(make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)))

    def cv_map(c: float) -> float:
        scores = []
        for fit, out in KFold(5, shuffle=True, random_state=0).split(f):
            m = model(c).fit(np.concatenate([f[fit], fm[fit]]), np.concatenate([y[fit], y[fit]]))
            present = y[out].sum(0) > 0
            scores.append(average_precision_score(y[out][:, present], m.predict_proba(f[out])[:, present],
                                                  average="macro"))
        return float(np.mean(scores))

    cv = {c: cv_map(c) for c in BASELINE_C}
    best = max(cv, key=cv.get)
    final = model(best).fit(np.concatenate([f, fm]), np.concatenate([y, y]))
    probs = torch.from_numpy(final.predict_proba(ft)).float()
    metrics = multilabel_metrics(torch.from_numpy(yt), probs, [0.5] * len(labels), labels)
    return {"map_macro": metrics["map_macro"], "map_micro": metrics["map_micro"],
            "subset_accuracy": metrics["subset_accuracy"], "hamming_loss": metrics["hamming_loss"],
            "micro_f1": metrics["micro_f1"], "C": best, "cv_map": round(cv[best], 6),
            "seconds": round(time.perf_counter() - started, 1)}


def graft(train_x, train_y, test_x, test_y, pre, labels, seed: int) -> dict:
    started = time.perf_counter()
    splits = stratified_split(rarest_labels(train_y), 0.2, seed)  # as a job splits an upload without val/
    tr = torch.tensor([s == "train" for s in splits])
    data = PreparedData(labels, pre, train_x[tr], train_y[tr], train_x[~tr], train_y[~tr], val_given=False,
                        multi_label=True)
    spec = get_backbone(DEFAULT_BACKBONE)
    result = train(TrainConfig(strategy="auto", backbone=spec.name, seed=seed), data,
                   spec.build_features(pretrained=True), spec.feature_dim, NullControl(), torch.device("cpu"))
    trained = time.perf_counter() - started
    probs = predicted_probabilities(result.classifier, test_x, data, torch.device("cpu"), NullControl())
    metrics = multilabel_metrics(test_y, probs, result.classifier.thresholds, labels)
    return {"map_macro": metrics["map_macro"], "map_micro": metrics["map_micro"],
            "subset_accuracy": metrics["subset_accuracy"], "hamming_loss": metrics["hamming_loss"],
            "micro_f1": metrics["micro_f1"], "chosen_C": result.recipe.get("logistic_c"),
            "out_of_fold_map": result.metrics["map_macro"], "thresholds": result.metrics["thresholds"],
            "train_seconds": round(trained, 1), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=240, help="train mosaics (from train/ photos)")
    parser.add_argument("--test", type=int, default=120, help="test mosaics (from val/ photos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    labels = sorted(CLASSES)
    pre = get_backbone(DEFAULT_BACKBONE).preprocessing
    train_items = draw_mosaics(CLASSES, "train", args.train, seed=args.seed + 1, side=256)
    test_items = draw_mosaics(CLASSES, "val", args.test, seed=args.seed + 2, side=256)
    train_x, train_y = decoded(train_items, labels, pre)
    test_x, test_y = decoded(test_items, labels, pre)
    made = time.perf_counter() - started
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "load_average": [round(v, 2) for v in os.getloadavg()],
           "images": {"train": len(train_items), "test": len(test_items),
                      "labels_per_image": {str(k): int((train_y.sum(1) == k).sum()) for k in (1, 2, 3)},
                      "positives": dict(zip(labels, train_y.sum(0).int().tolist()))},
           "mosaics_seconds": round(made, 1),
           "graft": graft(train_x, train_y, test_x, test_y, pre, labels, args.seed),
           "baseline": baseline(train_x, train_y, test_x, test_y, pre, labels)}
    out["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
