"""Accuracy on data Graft never saw, through the HTTP API, against the 30-line baseline.

    python bench/accuracy.py --dataset ../shared/datasets/bloodcells --json /tmp/bloodcells.json
    python bench/accuracy.py --dataset DIR --job '{"time_budget_s": 300}' --url http://host:8000

The protocol (issue 15): DIR is an ImageFolder set, `DIR/train/<class>/*` and `DIR/val/<class>/*`.
Only train/ is uploaded, so Graft makes its own split (auto then cross-validates over all of it).
The default job (strategy auto unless --job says otherwise) runs; the model is scored through
/predict on the val/ images, which Graft never saw. Then the same job is submitted again on the
same upload (a warm worker: decoded images and features reused).

The baseline in the same run is what a competent user writes: scikit-learn LogisticRegression on
standardized frozen features of the same backbone (Graft's own decode and eval crop: resize 256
bicubic, centre crop 224 for Lite0), C in {0.1, 0.3, 1, 3, 10} chosen by 5-fold stratified CV over
the training images (each fold trained on its images plus their mirrors), refitted on all of them
plus mirrors, and scored on the val/ images.

Prints and (with --json) writes: held-out accuracy of both, Graft's estimate and 95% interval,
whether the held-out accuracy is inside it, submit->ready of the first and the repeat job.
Timings on a shared machine are noisy: the load average is recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.e2e import own_server, train_once, zip_folder  # noqa: E402
from workers.backbones import DEFAULT_BACKBONE, get_backbone  # noqa: E402
from workers.imaging import ImageRejected  # noqa: E402
from workers.preprocessing import decode_square, eval_crop  # noqa: E402
from workers.training.contract import NullControl  # noqa: E402
from workers.training.parts import features_of  # noqa: E402

BASELINE_C = (0.1, 0.3, 1.0, 3.0, 10.0)
PREDICT_BATCH = 16


def labeled_files(folder: Path) -> list[tuple[Path, str]]:
    return [(p, p.parent.name) for p in sorted(folder.glob("*/*")) if p.is_file()]


# --- Graft, through the API ---------------------------------------------------------------------

def graft_run(url: str, dataset: Path, job: dict, repeat: bool) -> dict:
    client = httpx.Client(base_url=url, timeout=900)
    resp = client.post("/v1/datasets", files={"file": ("train.zip", zip_folder(dataset / "train"))},
                       data={"name": dataset.name})
    resp.raise_for_status()
    ds = resp.json()
    strategy = job.pop("strategy", "auto")
    first, ready_s = train_once(client, ds["id"], strategy, job)
    model = client.get(f"/v1/models/{first['model_id']}").json()
    held_out = predict_accuracy(client, model["id"], labeled_files(dataset / "val"))
    repeat_s = train_once(client, ds["id"], strategy, job)[1] if repeat else None
    m = model["metrics"]
    return {"images_uploaded": ds["num_images"], "held_out_accuracy": held_out, "reported": m["val_accuracy"],
            "estimate": m.get("estimate"), "trained_on": m.get("trained_on"),
            "selection_accuracy": m.get("selection_accuracy"), "recipe": (m.get("auto") or {}).get("chosen"),
            "candidates": (m.get("auto") or {}).get("candidates"), "submit_to_ready_s": round(ready_s, 1),
            "repeat_submit_to_ready_s": round(repeat_s, 1) if repeat_s is not None else None,
            "train_seconds": m.get("train_seconds")}


def predict_accuracy(client: httpx.Client, model_id: str, files: list[tuple[Path, str]]) -> float:
    correct = 0
    for start in range(0, len(files), PREDICT_BATCH):
        batch = files[start:start + PREDICT_BATCH]
        resp = client.post(f"/v1/models/{model_id}/predict", params={"top_k": 1},
                           files=[("file", (p.name, p.read_bytes())) for p, _ in batch])
        resp.raise_for_status()
        correct += sum(r["predictions"][0]["label"] == label for r, (_, label) in zip(resp.json()["results"], batch))
    return round(correct / len(files), 4)


# --- the baseline: a user's own script on the same frozen features --------------------------------

def frozen_features(files: list[tuple[Path, str]], backbone: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features of each decodable image and of its mirror (Graft's decode and eval crop), and labels."""
    spec = get_backbone(backbone)
    pre = spec.preprocessing
    squares, labels = [], []
    for path, label in files:
        try:
            squares.append(decode_square(path.read_bytes(), pre))
        except ImageRejected:
            continue  # Graft rejects it at upload too
        labels.append(label)
    crops = eval_crop(torch.stack(squares), pre)
    features = spec.build_features(pretrained=True).eval()
    cpu = torch.device("cpu")
    x = features_of(features, crops, pre, cpu, NullControl())
    x_mirror = features_of(features, crops.flip(-1), pre, cpu, NullControl())
    return x, x_mirror, labels


def baseline(dataset: Path, backbone: str) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    started = time.perf_counter()
    x, xm, labels = frozen_features(labeled_files(dataset / "train"), backbone)
    vx, _, vlabels = frozen_features(labeled_files(dataset / "val"), backbone)
    classes = sorted(set(labels))
    y = np.array([classes.index(c) for c in labels])
    x, xm = x.numpy(), xm.numpy()

    def model(c):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    def cv_accuracy(c: float) -> float:
        hits = 0
        for fit, held in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
            m = model(c).fit(np.concatenate([x[fit], xm[fit]]), np.concatenate([y[fit], y[fit]]))
            hits += int((m.predict(x[held]) == y[held]).sum())
        return hits / len(y)

    scores = {c: cv_accuracy(c) for c in BASELINE_C}
    best_c = max(scores, key=scores.get)
    final = model(best_c).fit(np.concatenate([x, xm]), np.concatenate([y, y]))
    vy = np.array([classes.index(c) for c in vlabels])
    held_out = float((final.predict(vx.numpy()) == vy).mean())
    return {"backbone": backbone, "held_out_accuracy": round(held_out, 4), "C": best_c, "cv_accuracy": {str(c): round(s, 4) for c, s in
                                                                                  scores.items()},
            "seconds": round(time.perf_counter() - started, 1)}


# --- the run ------------------------------------------------------------------------------------------

def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def summary(name: str, graft: dict, base: dict, same: dict | None) -> dict:
    est = graft["estimate"] or {}
    lo, hi = est.get("ci95", [None, None])
    held = graft["held_out_accuracy"]
    chosen = (graft["recipe"] or {}).get("backbone")
    versus_same = {} if same is None else {
        "baseline_on_chosen_backbone_held_out": same["held_out_accuracy"],
        "margin_over_chosen_backbone_points": round(100 * (held - same["held_out_accuracy"]), 2)}
    return {"dataset": name, "chosen_backbone": chosen, "graft_held_out": held,
            "baseline_backbone": base.get("backbone"), "baseline_held_out": base["held_out_accuracy"],
            "margin_points": round(100 * (held - base["held_out_accuracy"]), 2), **versus_same,
            "graft_estimate": graft["reported"], "ci95": [lo, hi],
            "estimate_error_points": round(100 * (graft["reported"] - held), 2),
            "held_out_inside_ci95": lo is not None and lo <= held <= hi,
            "submit_to_ready_s": graft["submit_to_ready_s"], "repeat_submit_to_ready_s": graft["repeat_submit_to_ready_s"],
            "machine": machine(), "load_average_1_5_15": [round(v, 1) for v in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="ImageFolder root with train/ and val/")
    parser.add_argument("--backbone", help="the job's backbone (default: the job leaves it to auto) and the "
                        "baseline's (default: efficientnet_lite0, a user's script on Graft's default)")
    parser.add_argument("--job", default="{}", help="job fields as JSON (default: the default job)")
    parser.add_argument("--url", help="a running Graft; default: start one on a fresh data dir")
    parser.add_argument("--no-repeat", action="store_true", help="skip the repeat job")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    job = {**({"backbone": args.backbone} if args.backbone else {}), **json.loads(args.job)}
    if args.url:
        graft = graft_run(args.url, args.dataset, job, not args.no_repeat)
    else:
        with own_server(workers=1) as (url, _):
            graft = graft_run(url, args.dataset, job, not args.no_repeat)
    base_backbone = args.backbone or DEFAULT_BACKBONE
    base = baseline(args.dataset, base_backbone) if not args.no_baseline else {"held_out_accuracy": float("nan")}
    # When auto chose another backbone, the same script on that backbone too: how much is the head.
    chosen = (graft["recipe"] or {}).get("backbone", base_backbone)
    same = baseline(args.dataset, chosen) if chosen != base_backbone and not args.no_baseline else None
    result = {"summary": summary(args.dataset.name, graft, base, same), "graft": graft, "baseline": base,
              "baseline_on_chosen_backbone": same}
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
