"""Label efficiency (issue 16): how much unlabeled images and chosen labels buy, on held-out val.

    python bench/label_efficiency.py                        # hymenoptera and bloodcells, 3 seeds
    python bench/label_efficiency.py --quick                # a reduced run (< 3 min on 2 cores)
    python bench/label_efficiency.py --json out.json --png docs/label_efficiency.png

Each DIR is an ImageFolder set (`train/<class>/*`, `val/<class>/*`); val is the test set, never
trained or chosen on. Frozen EfficientNet-Lite0 features of every image and its mirror are computed
once (Graft's decode, eval crop and frozen CPU backbone) and cached under --cache; everything after
runs Graft's own training code on them, in process:

1. Semi-supervised: with 10% and 25% of train labeled (stratified, at least 2 per class) and the
   rest unlabeled, the logistic head auto cross-validates (C over logistic.C_GRID, stratified
   folds, mirrors, mirror-averaged prediction) trained on the labeled images only, against the same
   head self-trained on the unlabeled rest (workers/training/semi.py: what auto's pseudo-label
   candidate and its refit run), and against supervised on 100% of train. "gap closed" is
   (semi - supervised) / (supervised 100% - supervised). "auto picks" is what auto's cross-
   validation between the two would keep (its out-of-fold accuracy on the labeled images).
2. Active learning: start with 5 labeled per class, then rounds of 20 more chosen by the
   suggestions' ranking (service/serving/suggestions.py: margin, diverse) from the model trained
   on the labels so far (calibrated by its inner folds' temperature), against 20 at random; the
   head is refitted each round (C by cross-validation). Reported: val accuracy per number of labels,
   and the fewest labels at which each strategy reaches random's accuracy at 100 labels.

Prints a markdown table; writes JSON (--json) and a PNG of the learning curves (--png; matplotlib).
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

from service.serving.suggestions import rank  # noqa: E402
from workers.backbones import DEFAULT_BACKBONE, freeze_for_cpu, get_backbone  # noqa: E402
from workers.imaging import ImageRejected, inspect_image  # noqa: E402
from workers.preprocessing import decode_square, eval_crop  # noqa: E402
from workers.training import logistic, selection, semi  # noqa: E402
from workers.training.contract import NullControl  # noqa: E402
from workers.training.parts import features_of  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets"
FRACTIONS = (0.10, 0.25)
START_PER_CLASS, PER_ROUND = 5, 20


# --- features, once -------------------------------------------------------------------------------

def features(folder: Path, cache: Path, limit_per_class: int | None) -> dict:
    """Frozen features (and mirrors' features) of every decodable image of folder/<class>/*, with labels."""
    tag = f"{folder.parent.name}-{folder.name}-{limit_per_class or 'all'}"
    path = cache / f"label_efficiency-{tag}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    spec = get_backbone(DEFAULT_BACKBONE)
    pre = spec.preprocessing
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    squares, labels, hashes = [], [], []
    for y, c in enumerate(classes):
        files = sorted(p for p in (folder / c).iterdir() if p.is_file())[:limit_per_class]
        for p in files:
            data = p.read_bytes()
            try:
                squares.append(decode_square(data, pre))
                hashes.append(inspect_image(data, 89_478_485).phash)
            except ImageRejected:
                continue
            labels.append(y)
    crops = eval_crop(torch.stack(squares), pre)
    backbone = spec.build_features(pretrained=True).eval()
    runner = freeze_for_cpu(backbone, pre.input_size) or backbone
    cpu = torch.device("cpu")
    x = features_of(runner, crops, pre, cpu, NullControl())
    xm = features_of(runner, crops, pre, cpu, NullControl(), mirrored=True)
    entry = {"x": x, "xm": xm, "y": torch.tensor(labels), "classes": classes, "phash": hashes}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(entry, path)
    return entry


# --- the heads (auto's logistic heads and self-training) -------------------------------------------

def chosen_c(x, xm, y, num_classes: int, seed: int) -> float:
    """C by stratified cross-validation over logistic.C_GRID, as auto's heads are chosen."""
    k = selection.fold_count(y)
    folds = selection.stratified_folds(y, k, seed)
    logits = {c: torch.zeros(len(y), num_classes) for c in logistic.C_GRID}
    for f in range(k):
        fit_rows, out_rows = folds != f, folds == f
        tx, ty = logistic.training_set(x[fit_rows], y[fit_rows], xm[fit_rows])
        path = logistic.LogisticPath(tx, ty, num_classes)
        for c in logistic.C_GRID:
            logits[c][out_rows] = logistic.head_logits(path.fit(c), x[out_rows], xm[out_rows])
    scored = [logits[c] for c in logistic.C_GRID]
    return logistic.C_GRID[selection.select(scored, y)]


def supervised(x, xm, y, num_classes: int, c: float) -> logistic.LinearMap:
    tx, ty = logistic.training_set(x, y, xm)
    return logistic.fit_logistic(tx, ty, num_classes, c)


def accuracy(fit: logistic.LinearMap, data: dict) -> float:
    logits = logistic.head_logits(fit, data["x"], data["xm"])
    return float((logits.argmax(1) == data["y"]).float().mean())


def stratified_subset(y: torch.Tensor, fraction: float, seed: int, minimum: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in torch.unique(y).tolist():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        chosen.append(members[:max(minimum, round(fraction * len(members)))])
    return torch.cat(chosen).sort().values


def semi_experiment(train: dict, val: dict, seed: int, auto_check: bool) -> list[dict]:
    x, xm, y, n_classes = train["x"], train["xm"], train["y"], len(train["classes"])
    full = supervised(x, xm, y, n_classes, chosen_c(x, xm, y, n_classes, seed))
    full_acc = accuracy(full, val)
    rows = []
    for fraction in FRACTIONS:
        labeled = stratified_subset(y, fraction, seed)
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[labeled] = True
        lx, lxm, ly = x[mask], xm[mask], y[mask]
        c = chosen_c(lx, lxm, ly, n_classes, seed)
        t0 = time.perf_counter()
        sup_acc = accuracy(supervised(lx, lxm, ly, n_classes, c), val)
        trained = semi.self_train(lx, lxm, ly, x[~mask], xm[~mask], n_classes, c, seed=seed)
        semi_acc = accuracy(trained.fit, val)
        pseudo = trained.last
        right = float((pseudo.labels == y[~mask][pseudo.index]).float().mean()) if pseudo is not None and len(pseudo.index) else None
        row = {"fraction": fraction, "labeled": int(mask.sum()), "unlabeled": int((~mask).sum()), "C": c,
               "supervised": round(sup_acc, 4), "semi_supervised": round(semi_acc, 4), "supervised_100": round(full_acc, 4),
               "gap_closed": round((semi_acc - sup_acc) / (full_acc - sup_acc), 3) if full_acc > sup_acc else None,
               "pseudo_labeled": int(len(pseudo.index)) if pseudo is not None else 0,
               "pseudo_label_accuracy": round(right, 4) if right is not None else None,
               "seconds": round(time.perf_counter() - t0, 2)}
        if auto_check:  # what auto's cross-validation between the two would keep
            k = selection.fold_count(ly)
            folds = selection.stratified_folds(ly, k, seed)
            oof_sup = torch.zeros(len(ly), n_classes)
            for f in range(k):
                fit_rows, out_rows = folds != f, folds == f
                oof_sup[out_rows] = logistic.head_logits(supervised(lx[fit_rows], lxm[fit_rows], ly[fit_rows], n_classes, c),
                                                         lx[out_rows], lxm[out_rows])
            oof_semi = semi.out_of_fold(lx, lxm, ly, folds, x[~mask], xm[~mask], n_classes, c, seed=seed)
            row["auto_picks"] = "semi" if selection.select([oof_sup, oof_semi], ly) == 1 else "supervised"
        rows.append(row)
    return rows


# --- active learning --------------------------------------------------------------------------------

def active_experiment(train: dict, val: dict, strategy: str, seed: int, max_labels: int) -> list[dict]:
    x, xm, y, n_classes = train["x"], train["xm"], train["y"], len(train["classes"])
    gen = torch.Generator().manual_seed(seed)
    labeled = torch.zeros(len(y), dtype=torch.bool)
    for c in range(n_classes):
        members = torch.nonzero(y == c).flatten()
        labeled[members[torch.randperm(len(members), generator=gen)[:START_PER_CLASS]]] = True
    curve = []
    while True:
        lx, lxm, ly = x[labeled], xm[labeled], y[labeled]
        c = chosen_c(lx, lxm, ly, n_classes, seed)
        fit = supervised(lx, lxm, ly, n_classes, c)
        curve.append({"labels": int(labeled.sum()), "accuracy": round(accuracy(fit, val), 4)})
        pool = torch.nonzero(~labeled).flatten()
        if int(labeled.sum()) >= max_labels or not len(pool):
            return curve
        take = min(PER_ROUND, len(pool))
        if strategy == "random":
            picks = pool[torch.randperm(len(pool), generator=gen)[:take]]
        else:
            temperature = semi.inner_temperature(lx, lxm, ly, n_classes, c, False, seed)
            probs = torch.softmax(logistic.head_logits(fit, x[pool], xm[pool]) / temperature, 1)
            feats = (x[pool] + xm[pool]) / 2
            order = rank(strategy, probs, feats.float(), [train["phash"][i] for i in pool.tolist()], take)
            picks = pool[torch.tensor(order)]
        labeled[picks] = True


def labels_to_reach(curve: list[dict], target: float) -> int | None:
    return next((p["labels"] for p in curve if p["accuracy"] >= target), None)


def at_labels(curve: list[dict], n: int) -> float | None:
    """Accuracy at n labels (the first point with at least n)."""
    return next((p["accuracy"] for p in curve if p["labels"] >= n), None)


# --- suggestions' speed once features are cached -------------------------------------------------------

def suggestion_seconds(n: int = 1000, classes: int = 8, dim: int = 1280) -> dict:
    """service.serving.suggestions.suggest over n unlabeled images whose features (and mirrors') are
    already kept: the head, the calibration and each strategy's ranking (the API adds one SQL query)."""
    from service.serving.suggestions import Candidate, Suggestions, suggest
    from workers.artifacts import Classifier, LoadedModel

    classifier = Classifier(torch.nn.Identity(), dim, classes).eval()
    classifier.tta_flip = True
    pre = get_backbone(DEFAULT_BACKBONE).preprocessing
    loaded = LoadedModel(classifier, [f"c{i}" for i in range(classes)], pre, {"backbone_weights": {}})
    kept = Suggestions()
    gen = torch.Generator().manual_seed(0)
    key = kept.backbone_key(loaded, "bench")
    candidates = []
    for i in range(n):
        sha = f"{i:064x}"
        kept._put((key, sha), (torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)))
        candidates.append(Candidate(sha, f"u{i}.jpg", f"{int(torch.randint(0, 2**62, (1,), generator=gen)):016x}"))
    out = {}
    for strategy in ("margin", "entropy", "diverse"):
        t0 = time.perf_counter()
        answer = suggest(None, kept, loaded, "bench", candidates, lambda sha: b"", strategy, 20)
        out[strategy] = round(time.perf_counter() - t0, 3)
        assert answer["scored_images"] == n and len(answer["suggestions"]) == 20
    return {"images": n, "seconds": out}


# --- the run -------------------------------------------------------------------------------------------

def run_dataset(root: Path, seeds: list[int], cache: Path, limit: int | None, max_labels: int, auto_check: bool) -> dict:
    t0 = time.perf_counter()
    train, val = features(root / "train", cache, limit), features(root / "val", cache, limit)
    feature_s = time.perf_counter() - t0
    semi_rows = [r | {"seed": s} for s in seeds for r in semi_experiment(train, val, s, auto_check)]
    curves = {strategy: [active_experiment(train, val, strategy, s, max_labels) for s in seeds]
              for strategy in ("random", "margin", "diverse")}
    mean = {strategy: _mean_curve(runs) for strategy, runs in curves.items()}
    target = at_labels(mean["random"], 100)
    return {"dataset": root.name, "train_images": len(train["y"]), "val_images": len(val["y"]),
            "classes": len(train["classes"]), "feature_seconds": round(feature_s, 1), "semi": semi_rows,
            "active_mean": mean, "random_at_100": target,
            "labels_to_reach_random_at_100": {s: labels_to_reach(c, target) if target is not None else None
                                              for s, c in mean.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def _mean_curve(runs: list[list[dict]]) -> list[dict]:
    n = min(len(r) for r in runs)
    return [{"labels": runs[0][i]["labels"], "accuracy": round(float(np.mean([r[i]["accuracy"] for r in runs])), 4)}
            for i in range(n)]


def table(results: list[dict]) -> str:
    lines = ["| dataset | labeled | supervised | semi-supervised | supervised 100% | gap closed | pseudo-labels (right) | auto picks |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for fraction in FRACTIONS:
            rows = [r for r in res["semi"] if r["fraction"] == fraction]
            m = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
            gaps = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
            right = [r["pseudo_label_accuracy"] for r in rows if r["pseudo_label_accuracy"] is not None]
            picks = ", ".join(sorted({r.get("auto_picks", "-") for r in rows}))
            lines.append(f"| {res['dataset']} | {fraction:.0%} ({rows[0]['labeled']}) | {m('supervised'):.4f} | "
                         f"{m('semi_supervised'):.4f} | {m('supervised_100'):.4f} | "
                         f"{np.mean(gaps):.2f} | {m('pseudo_labeled'):.0f} ({np.mean(right) if right else float('nan'):.3f}) | {picks} |")
    lines += ["", "| dataset | strategy | " + " | ".join(f"{n} labels" for n in _grid(results)) + " | labels to reach random@100 |",
              "|---|---|" + "---|" * (len(_grid(results)) + 1)]
    for res in results:
        for strategy, curve in res["active_mean"].items():
            cells = [at_labels(curve, n) for n in _grid(results)]
            lines.append(f"| {res['dataset']} | {strategy} | " + " | ".join(f"{c:.4f}" if c is not None else "–" for c in cells)
                         + f" | {res['labels_to_reach_random_at_100'][strategy]} |")
    return "\n".join(lines)


def _grid(results: list[dict]) -> list[int]:
    return sorted({p["labels"] for res in results for p in res["active_mean"]["random"]})


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        for strategy, curve in res["active_mean"].items():
            ax.plot([p["labels"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=f"active: {strategy}")
        for fraction, marker in zip(FRACTIONS, ("s", "D")):
            rows = [r for r in res["semi"] if r["fraction"] == fraction]
            n = rows[0]["labeled"]
            ax.scatter([n], [np.mean([r["supervised"] for r in rows])], marker=marker, color="grey",
                       label=f"{fraction:.0%} labeled, supervised")
            ax.scatter([n], [np.mean([r["semi_supervised"] for r in rows])], marker=marker, color="black",
                       label=f"{fraction:.0%} labeled + unlabeled rest, self-trained")
        ax.axhline(np.mean([r["supervised_100"] for r in res["semi"]]), color="green", linestyle=":",
                   label="100% labeled, supervised")
        ax.set_title(f"{res['dataset']} (val, {res['val_images']} images)")
        ax.set_xlabel("labeled training images")
        ax.set_ylabel("val accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="*", type=Path,
                        default=[SHARED / "hymenoptera", SHARED / "bloodcells"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-labels", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="one seed, bloodcells at 40 images per class, "
                                                             "labels up to 120, no auto check")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/graft-bench-cache"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "label_efficiency.png")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    seeds = list(range(1 if args.quick else args.seeds))
    results = []
    for root in args.datasets:
        limit = 40 if args.quick and root.name == "bloodcells" else None
        results.append(run_dataset(root, seeds, args.cache, limit, 120 if args.quick else args.max_labels,
                                   auto_check=not args.quick))
    md = table(results)
    print(md)
    speed = suggestion_seconds()
    print(f"suggestions for {speed['images']} unlabeled images with cached features: {speed['seconds']} s")
    summary = {"results": results, "table": md, "quick": args.quick, "seeds": seeds, "suggestions": speed,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "load_average_1_5_15": [round(v, 1) for v in os.getloadavg()]}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.png:
        plot(results, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
