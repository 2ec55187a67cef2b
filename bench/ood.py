""""None of these" (issue 17): a hymenoptera model shown bloodcells images, and the reverse.

    python bench/ood.py [--json out.json] [--cache DIR]

For each data set, the model is what Graft's worker trains from its train/ folder uploaded alone
(Graft's own 80/20 split, so auto cross-validates over all of it), through `workers.training.train`
itself: strategy auto on Lite0, its heads on frozen features (the budget keeps it to the logistic
heads, so the run fits in three minutes; auto on a CPU would fine-tune the top of the network for
bloodcells, whose score is then "energy": not measured here). The backbone's features of every
image and its mirror are computed once in this process and handed to the worker's feature cache
(`probe.REUSED_FEATURES`), so auto reads them as a warm worker does; the out-of-distribution
score and its threshold are fitted by the same call the worker makes (`training.fit_unknown`, on
the held-out out-of-fold predictions only).

With `--top`, one more model: bloodcells trained by `auto` from its decoded train/ pixels with the
default budget, as a CPU job runs it, so that it fine-tunes the top of the network
(fine_tune_top); its cosine score comes from each fold's own network (workers/training/auto.py
`_cv_top`), and it scores through the tuned network's own forward (about 4 more minutes).

Then each model scores, as /predict does (`OutOfDistribution.score` on the served logits and
features, mirror-averaged): its own val/ images (never uploaded: in distribution) and the other
data set's val/ images (foreign). Reported per score kind (workers/ood.MEASURED_KINDS, each with
its threshold fitted the same way): AUROC of own-val against foreign, the share of own val/
images that pass the threshold (target about 95%) and the share of foreign images answered
unknown (target >= 90%). The kind a model stores is the one `fit_ood` picks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from safetensors.torch import load_file, save_file  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from workers.artifacts import backbone_fingerprint  # noqa: E402
from workers.backbones import freeze_for_cpu, get_backbone  # noqa: E402
from workers.config import TrainConfig  # noqa: E402
from workers.data import stratified_split  # noqa: E402
from workers.imaging import ImageRejected  # noqa: E402
from workers.ood import MEASURED_KINDS, fit_ood  # noqa: E402
from workers.preprocessing import decode_square, eval_crop  # noqa: E402
from workers.training import train  # noqa: E402
from workers.training.contract import NullControl, PreparedData  # noqa: E402
from workers.training.parts import features_of  # noqa: E402
from workers.training.probe import REUSED_FEATURES  # noqa: E402

SHARED = Path(os.environ.get("GRAFT_DATASETS") or REPO.parent / "shared" / "datasets")
BACKBONE = "efficientnet_lite0"


def decoded(folder: Path, pre) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    xs, ys = [], []
    for y, c in enumerate(classes):
        for p in sorted(q for q in (folder / c).iterdir() if q.is_file()):
            try:
                xs.append(decode_square(p.read_bytes(), pre))
            except ImageRejected:
                continue
            ys.append(y)
    return torch.stack(xs), torch.tensor(ys), classes


def features(name: str, split: str, pre, runner, cache: Path | None) -> dict[str, torch.Tensor]:
    """Decoded squares, labels, features and mirrored features of one split (cached to `cache`)."""
    path = cache / f"{name}-{split}-{pre.input_size}.safetensors" if cache else None
    if path is not None and path.is_file():
        return load_file(str(path))
    x, y, classes = decoded(SHARED / name / split, pre)
    crops = eval_crop(x, pre)
    cpu = torch.device("cpu")
    f = features_of(runner, crops, pre, cpu, NullControl())
    fm = features_of(runner, crops, pre, cpu, NullControl(), mirrored=True)
    out = {"y": y, "f": f.contiguous(), "fm": fm.contiguous(),
           "classes": torch.tensor(list(b"\n".join(c.encode() for c in classes)), dtype=torch.uint8)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(out, str(path))
    return out


def class_names(entry) -> list[str]:
    return bytes(entry["classes"].tolist()).decode().split("\n")


def trained(name: str, upload: dict, pre, backbone) -> tuple:
    """The worker's model from the uploaded train/ images (Graft's own split), features reused."""
    config = TrainConfig(strategy="auto", backbone=BACKBONE, time_budget_s=10)
    splits = stratified_split(upload["y"].tolist(), config.val_fraction, config.seed)
    tr = torch.tensor([s == "train" for s in splits])
    order = torch.cat([torch.nonzero(tr).flatten(), torch.nonzero(~tr).flatten()])
    n_train = int(tr.sum())
    y, f, fm = (upload[k][order] for k in ("y", "f", "fm"))
    # auto reads the features from the worker's cache, never these pixels: a view of one zero pixel
    x = torch.zeros((1, 3, 1, 1), dtype=torch.uint8).expand(len(y), 3, pre.resize_size, pre.resize_size)
    data = PreparedData(class_names(upload), pre, x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                        source_key=f"bench-ood-{name}", val_given=False)
    key = REUSED_FEATURES.key(data, backbone_fingerprint(backbone.state_dict()))
    REUSED_FEATURES.put(key, {"train": f[:n_train], "val": f[n_train:], "train_mirror": fm[:n_train],
                              "val_mirror": fm[n_train:]})
    t0 = time.perf_counter()
    result = train(config, data, backbone, get_backbone(BACKBONE).feature_dim, NullControl(), torch.device("cpu"))
    return result, data, time.perf_counter() - t0


def trained_top(upload: dict, x: torch.Tensor, pre, backbone) -> tuple:
    """bloodcells' model from its pixels (Graft's own split), auto at the default budget."""
    config = TrainConfig(strategy="auto", backbone=BACKBONE)
    splits = stratified_split(upload["y"].tolist(), config.val_fraction, config.seed)
    tr = torch.tensor([s == "train" for s in splits])
    n_train = int(tr.sum())
    order = torch.cat([torch.nonzero(tr).flatten(), torch.nonzero(~tr).flatten()])
    y, x = upload["y"][order], x[order]
    data = PreparedData(class_names(upload), pre, x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                        source_key="bench-ood-top", val_given=False)
    t0 = time.perf_counter()
    result = train(config, data, backbone, get_backbone(BACKBONE).feature_dim, NullControl(), torch.device("cpu"))
    return result, data, time.perf_counter() - t0


@torch.no_grad()
def network_split(classifier, x_u8: torch.Tensor, pre) -> dict[str, torch.Tensor]:
    """A split seen through a tuned network: its own features of each eval crop and its mirror."""
    crops = eval_crop(x_u8, pre)
    cpu = torch.device("cpu")
    return {"f": features_of(classifier.features, crops, pre, cpu, NullControl()),
            "fm": features_of(classifier.features, crops, pre, cpu, NullControl(), mirrored=True)}


@torch.no_grad()
def served_scores(classifier, ood, split: dict) -> torch.Tensor:
    """What /predict computes: head logits, mirror-averaged, then the score (engine._forward)."""
    logits = classifier.head_logits(split["f"]).float()
    mirrored = classifier.head_logits(split["fm"]).float() if classifier.tta_flip else None
    served, _ = classifier.serve(logits, mirrored)
    return ood.score(served, classifier.temperature, split["f"], split["fm"] if classifier.tta_flip else None)


def measure(result, data, own_val: dict, foreign: dict) -> dict:
    classifier, held = result.classifier, result.held_out
    pooled_y = torch.cat([data.train_y, data.val_y])
    out = {"stored": classifier.ood.config() if classifier.ood is not None else None, "kinds": {}}
    for kind in MEASURED_KINDS:
        if kind in ("cosine", "mahalanobis") and held.features is None:
            continue
        if kind == "mahalanobis" and held.feature_scores is not None:
            continue  # a tuned network's held-out features are its folds': only cosine is fitted from them
        ood = classifier.ood if classifier.ood is not None and classifier.ood.kind == kind else \
            fit_ood(held, data.classes, float(classifier.temperature), held.features, pooled_y, kind=kind)
        own, other = served_scores(classifier, ood, own_val), served_scores(classifier, ood, foreign)
        labels = torch.cat([torch.ones(len(own)), torch.zeros(len(other))])
        auroc = roc_auc_score(labels.numpy(), torch.cat([own, other]).double().numpy())
        out["kinds"][kind] = {"auroc": round(float(auroc), 4), "threshold": round(ood.threshold, 6),
                              "held_out_pass_rate": ood.details.get("held_out_pass_rate"),
                              "own_val_pass_rate": round(float((own >= ood.threshold).double().mean()), 4),
                              "foreign_unknown_rate": round(float((other < ood.threshold).double().mean()), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, help="keep decoded images and features here between runs")
    parser.add_argument("--top", action="store_true", help="also bloodcells' fine_tune_top model (about 4 min)")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 2)
    spec = get_backbone(BACKBONE)
    pre = spec.preprocessing
    backbone = spec.build_features(pretrained=True).eval()
    runner = freeze_for_cpu(backbone, pre.input_size) or backbone
    sets = {name: {split: features(name, split, pre, runner, args.cache) for split in ("train", "val")}
            for name in ("hymenoptera", "bloodcells")}
    feature_s = time.perf_counter() - started
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}",
              "load_average": [round(v, 2) for v in os.getloadavg()], "backbone": BACKBONE,
              "decode_and_features_s": round(feature_s, 1), "models": {}}
    for name, other in (("hymenoptera", "bloodcells"), ("bloodcells", "hymenoptera")):
        result, data, train_s = trained(name, sets[name]["train"], pre, backbone)
        entry = {"recipe": {k: result.recipe.get(k) for k in ("strategy", "solver", "logistic_c", "tta_flip")},
                 "train_s": round(train_s, 1), "own_val_images": len(sets[name]["val"]["y"]),
                 "foreign": other, "foreign_images": len(sets[other]["val"]["y"]),
                 **measure(result, data, sets[name]["val"], sets[other]["val"])}
        report["models"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    if args.top:
        x = {split: decoded(SHARED / "bloodcells" / split, pre)[0] for split in ("train", "val")}
        hym_val = decoded(SHARED / "hymenoptera" / "val", pre)[0]
        result, data, train_s = trained_top(sets["bloodcells"]["train"], x["train"], pre, backbone)
        own = network_split(result.classifier, x["val"], pre)
        foreign = network_split(result.classifier, hym_val, pre)
        entry = {"recipe": {k: result.recipe.get(k) for k in ("strategy", "unfreeze_stages", "epochs", "tta_flip")},
                 "train_s": round(train_s, 1), "own_val_images": len(x["val"]), "foreign": "hymenoptera",
                 "foreign_images": len(hym_val), **measure(result, data, own, foreign)}
        report["models"]["bloodcells, auto from pixels"] = entry
        print(json.dumps({"bloodcells, auto from pixels": entry}, indent=1), flush=True)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
