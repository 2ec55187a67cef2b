"""Recipe ablation: val accuracy (mean ± spread over seeds) of training recipes on an ImageFolder set.

    python bench/accuracy.py                                  # every grid, 3 seeds, full size
    python bench/accuracy.py --grid strategy,bn --image-size 128 --epochs 3 --seeds 3 --write

The dataset is a folder with `train/<label>/*` and `val/<label>/*` (or just `<label>/*`, split
20% stratified, once, with seed 0). Images are decoded once at --image-size and reused by every run; each
run trains from the pristine ImageNet weights through the same `workers.training.train` the worker
calls. --epochs overrides the epochs of the fine-tuning strategies only (linear probes keep
theirs). With --write the table, with the machine and the exact settings, replaces this script's
section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workers.backbones import get_backbone  # noqa: E402
from workers.config import TrainConfig  # noqa: E402
from workers.data import stratified_split  # noqa: E402
from workers.imaging import ImageRejected  # noqa: E402
from workers.preprocessing import decode_square  # noqa: E402
from workers.device import pick_device  # noqa: E402
from workers.training import PreparedData, train  # noqa: E402
from workers.training.contract import NullControl  # noqa: E402

DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "hymenoptera"
BENCHMARKS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench/accuracy.py: begin -->", "<!-- bench/accuracy.py: end -->"

# Each grid: rows of (label, recipe overrides). Fine-tuning rows share the fine_tune defaults.
GRIDS: dict[str, list[tuple[str, dict]]] = {
    "strategy": [
        ("linear_probe", {"strategy": "linear_probe"}),
        ("fine_tune", {"strategy": "fine_tune"}),
        ("partial (last 2 stages)", {"strategy": "partial"}),
        ("gradual", {"strategy": "gradual"}),
    ],
    "auto": [("auto (the default)", {})],
    "bn": [
        ("fine_tune, bn_mode=frozen (default)", {"strategy": "fine_tune"}),
        ("fine_tune, bn_mode=train", {"strategy": "fine_tune", "bn_mode": "train"}),
        ("fine_tune, bn_mode=adabn", {"strategy": "fine_tune", "bn_mode": "adabn"}),
        ("linear_probe, bn_mode=adabn", {"strategy": "linear_probe", "bn_mode": "adabn"}),
    ],
    "augmentation": [
        ("fine_tune, augmentation=none", {"strategy": "fine_tune", "augmentation": "none"}),
        ("fine_tune, augmentation=light (default)", {"strategy": "fine_tune"}),
        ("fine_tune, augmentation=strong", {"strategy": "fine_tune", "augmentation": "strong"}),
    ],
    "regularization": [
        ("fine_tune, weight_decay=0", {"strategy": "fine_tune", "weight_decay": 0.0}),
        ("fine_tune, weight_decay=0.05 (default)", {"strategy": "fine_tune"}),
        ("fine_tune, l2sp=0.01 (no decay on backbone)", {"strategy": "fine_tune", "l2sp": 0.01}),
    ],
    "mix": [("fine_tune, light + mixup 0.2", {"strategy": "fine_tune", "mixup_alpha": 0.2})],
    "probe": [
        ("linear_probe (defaults)", {"strategy": "linear_probe"}),
        ("linear_probe + mirrors + tta_flip", {"strategy": "linear_probe", "augmentation": "light",
                                              "tta_flip": True}),
        ("linear_probe, mlp head, dropout 0.2", {"strategy": "linear_probe", "head": "mlp", "dropout": 0.2,
                                                 "augmentation": "light", "tta_flip": True}),
        ("linear_probe, label_smoothing 0.1", {"strategy": "linear_probe", "label_smoothing": 0.1}),
        ("linear_probe, patience 10 on val_loss", {"strategy": "linear_probe", "patience": 10,
                                                  "monitor": "val_loss"}),
    ],
}


def load_folder(root: Path, image_size: int, backbone: str, seed: int) -> PreparedData:
    pre = get_backbone(backbone).preprocessing.at_size(image_size)
    has_split = (root / "train").is_dir() and (root / "val").is_dir()
    folders = [root / "train", root / "val"] if has_split else [root]
    classes = sorted({d.name for f in folders for d in f.iterdir() if d.is_dir()})
    items = []  # (square, label, split)
    for folder in folders:
        for label in classes:
            for path in sorted((folder / label).glob("*")) if (folder / label).is_dir() else []:
                try:
                    items.append((decode_square(path.read_bytes(), pre), classes.index(label), folder.name))
                except ImageRejected:
                    continue
    labels = [y for _, y, _ in items]
    splits = [s for _, _, s in items] if has_split else stratified_split(labels, 0.2, seed)

    def pick(split: str):
        idx = [i for i, s in enumerate(splits) if s == split]
        return torch.stack([items[i][0] for i in idx]), torch.tensor([labels[i] for i in idx])

    (tx, ty), (vx, vy) = pick("train"), pick("val")
    return PreparedData(classes, pre, tx, ty, vx, vy)


def run_recipe(overrides: dict, data: PreparedData, args, seed: int) -> dict:
    recipe = {"backbone": args.backbone, "image_size": args.image_size, "seed": seed, **overrides}
    if args.epochs and overrides.get("strategy") in ("fine_tune", "partial", "gradual"):
        recipe["epochs"] = args.epochs
    if args.budget and overrides.get("strategy", "auto") == "auto":
        recipe["time_budget_s"] = args.budget
    config = TrainConfig(**recipe)
    spec = get_backbone(args.backbone)
    features = spec.build_features(pretrained=True)
    started = time.perf_counter()
    result = train(config, data, features, spec.feature_dim, NullControl(), pick_device())
    m = result.metrics
    return {"val_accuracy": m["val_accuracy"], "ece_before": m["calibration"]["ece_before"],
            "ece_after": m["calibration"]["ece_after"], "seconds": time.perf_counter() - started,
            "epochs_run": m["epochs_run"], "chosen": (m.get("auto") or {}).get("chosen")}


def summarize(label: str, runs: list[dict]) -> dict:
    acc = [r["val_accuracy"] for r in runs]
    return {"label": label, "acc_mean": statistics.mean(acc), "acc_sd": statistics.pstdev(acc) if len(acc) > 1 else 0.0,
            "acc_min": min(acc), "acc_max": max(acc),
            "ece_before": statistics.mean(r["ece_before"] for r in runs),
            "ece_after": statistics.mean(r["ece_after"] for r in runs),
            "seconds": statistics.mean(r["seconds"] for r in runs),
            "epochs_run": statistics.mean(r["epochs_run"] for r in runs),
            "chosen": [_short(r["chosen"]) for r in runs if r["chosen"]]}


def _short(chosen: dict) -> str:
    keys = ("strategy", "head", "learning_rate", "augmentation", "tta_flip", "epochs")
    return ", ".join(f"{k}={chosen[k]}" for k in keys if chosen.get(k) is not None)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def shown_command() -> str:
    argv, out = sys.argv[1:], []
    while argv:
        arg = argv.pop(0)
        if arg == "--json":
            argv.pop(0)  # where the raw numbers went is not part of the recipe
        elif not arg.startswith("--json="):
            out.append(arg)
    return " ".join(["python bench/accuracy.py", *out])


def table(rows: list[dict], args, data: PreparedData, wall_s: float) -> str:
    load = os.getloadavg()[1]
    lines = [
        f"### {date.today().isoformat()} — {machine()}",
        "",
        f"Command: `{shown_command()}`. Dataset `{args.dataset.name}` "
        f"({len(data.train_y)} train / {len(data.val_y)} val images), backbone {args.backbone}, "
        f"{args.image_size} px, seeds {', '.join(map(str, range(args.seeds)))}; fine-tuning epochs: "
        f"{args.epochs or 'recipe default'}; everything else at its default. Wall time {wall_s / 60:.1f} min; "
        f"5-minute load average at the end {load:.1f} (seconds per run include waiting for the CPU).",
        "",
        "| recipe | val acc mean ± sd (min–max) | ECE before → after temperature | s / run | epochs run |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        note = f" — chose: {'; '.join(sorted(set(r['chosen'])))}" if r["chosen"] else ""
        lines.append(f"| {r['label']}{note} | {r['acc_mean']:.4f} ± {r['acc_sd']:.4f} ({r['acc_min']:.4f}–"
                     f"{r['acc_max']:.4f}) | {r['ece_before']:.3f} → {r['ece_after']:.3f} | "
                     f"{r['seconds']:.1f} | {r['epochs_run']:.1f} |")
    return "\n".join(lines) + "\n"


def write_section(text: str) -> None:
    doc = BENCHMARKS.read_text()
    if BEGIN in doc:
        head, rest = doc.split(BEGIN, 1)
        old = rest.split(END, 1)[0]
        doc = head + BEGIN + old + text + "\n" + END + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n" + BEGIN + "\n" + text + "\n" + END + "\n"
    BENCHMARKS.write_text(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--grid", default="strategy,auto,bn,augmentation,regularization,probe",
                        help=f"comma-separated, from: {', '.join(GRIDS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, help="epochs of the fine-tuning strategies (default: theirs)")
    parser.add_argument("--budget", type=float, help="time_budget_s for the auto rows")
    parser.add_argument("--write", action="store_true", help="add the table to docs/benchmarks.md")
    parser.add_argument("--json", type=Path, help="also dump every run's numbers here")
    args = parser.parse_args()
    started = time.perf_counter()
    data = load_folder(args.dataset, args.image_size, args.backbone, seed=0)
    rows, done, dump = [], {}, []
    for grid in args.grid.split(","):
        for label, overrides in GRIDS[grid]:
            key = json.dumps(overrides, sort_keys=True)  # the same recipe in two grids runs once
            if key not in done:
                done[key] = [run_recipe(overrides, data, args, seed) for seed in range(args.seeds)]
            runs = done[key]
            rows.append(summarize(f"{label} [{grid}]", runs))
            dump.append({"label": label, "overrides": overrides, "runs": runs})
            r = rows[-1]
            print(f"{label:50s} {r['acc_mean']:.4f} ± {r['acc_sd']:.4f}  ECE {r['ece_before']:.3f}->"
                  f"{r['ece_after']:.3f}  {r['seconds']:.1f} s/run", flush=True)
    text = table(rows, args, data, time.perf_counter() - started)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(dump, indent=2, default=str))
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
