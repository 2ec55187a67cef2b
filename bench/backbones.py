"""Every backbone whose weights are on this machine: frozen-feature images/s, and held-out accuracy
through the HTTP API against the baseline on the same backbone's features.

    python bench/backbones.py --json /tmp/backbones.json
    python bench/backbones.py --backbones efficientnet_lite0,timm/convnext_small --datasets ../shared/datasets/bloodcells
    python bench/backbones.py --throughput-only

Which backbones: the built-in ones, the operator's registered ones (GRAFT_BACKBONES_FILE, default
./data/backbones.json) and the timm models in the Hugging Face cache, each only when its weights
are here (nothing is downloaded).

Throughput: the pretrained features of each backbone over the first 64 hymenoptera val photos at
its native size, as a linear probe computes them (workers/training/probe.py: traced and frozen on a
CPU, batched with autocast on a GPU), after one warm-up pass; images/s of the forward.

Accuracy, the holdout protocol of issue 15 (bench/accuracy.py): only train/ is uploaded (Graft
makes its own split), the default job runs with `backbone` set to the backbone (auto keeps it and
chooses the rest), and the model is scored through /predict on the val/ images Graft never saw.
The baseline on the same features: scikit-learn LogisticRegression, C by 5-fold CV over the
training images plus mirrors. Timings on a shared machine are noisy; the load average is recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.accuracy import baseline, graft_run, machine  # noqa: E402
from bench.e2e import own_server  # noqa: E402
from tests.support.data import HYMENOPTERA, hymenoptera_files  # noqa: E402
from workers.backbone_registry import use_registry  # noqa: E402
from workers.backbones import BACKBONES, freeze_for_cpu, get_backbone  # noqa: E402
from workers.device import resolve_device  # noqa: E402
from workers.preprocessing import decode_square, eval_crop  # noqa: E402
from workers.timm_backbones import cached_timm_backbones  # noqa: E402
from workers.training.contract import NullControl  # noqa: E402
from workers.training.parts import features_of  # noqa: E402

DATASETS = [REPO.parent / "shared" / "datasets" / "hymenoptera", REPO.parent / "shared" / "datasets" / "bloodcells"]
THROUGHPUT_IMAGES = 64


def registry_file() -> Path:
    return Path(os.environ.get("GRAFT_BACKBONES_FILE") or REPO / "data" / "backbones.json").resolve()


def available_backbones() -> list[str]:
    names = list(BACKBONES) + [n for n in cached_timm_backbones() if n not in BACKBONES]
    return [n for n in names if get_backbone(n).weights_available()]


def throughput(name: str, device: torch.device) -> dict:
    spec = get_backbone(name)
    pre = spec.preprocessing
    photos = (hymenoptera_files("val", "ants") + hymenoptera_files("val", "bees"))[:THROUGHPUT_IMAGES]
    crops = eval_crop(torch.stack([decode_square(p.read_bytes(), pre) for p in photos]), pre)
    started = time.perf_counter()
    features = spec.build_features(pretrained=True).to(device)
    load_s = time.perf_counter() - started
    if device.type == "cpu":  # as the probe runs it (workers/training/probe.py)
        features = freeze_for_cpu(features, pre.input_size) or features
    features_of(features, crops[:8], pre, device, NullControl())  # warm-up (and, on a CPU, the trace)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = features_of(features, crops, pre, device, NullControl())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {"backbone": name, "source": spec.source, "input_size": pre.input_size, "feature_dim": int(out.shape[1]),
            "images_per_s": round(len(crops) / seconds, 1), "weights_load_s": round(load_s, 2),
            "weights_bytes": spec.weights_path().stat().st_size, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", help="comma-separated names (default: every one whose weights are here)")
    parser.add_argument("--datasets", type=Path, nargs="*", default=DATASETS, help="ImageFolder roots (train/, val/)")
    parser.add_argument("--job", default="{}", help="job fields as JSON (default: the default job)")
    parser.add_argument("--device", default="auto", help="for the throughput: auto, cpu or cuda:N")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        raise SystemExit(f"hymenoptera not found at {HYMENOPTERA}")
    registry = registry_file()
    use_registry(registry)
    names = args.backbones.split(",") if args.backbones else available_backbones()
    missing = [n for n in names if not get_backbone(n).weights_available()]
    if missing:
        raise SystemExit(f"no weights on this machine for {', '.join(missing)}")
    device = resolve_device(args.device)
    speed = []
    for name in names:
        speed.append(throughput(name, device))
        print(json.dumps(speed[-1]), flush=True)
    accuracy = []
    if not args.throughput_only:
        with own_server(workers=1, env={"GRAFT_BACKBONES_FILE": str(registry)}) as (url, _):
            for dataset in args.datasets:
                for name in names:
                    graft = graft_run(url, dataset, {"backbone": name, **json.loads(args.job)}, repeat=False)
                    base = baseline(dataset, name)
                    row = {"dataset": dataset.name, "backbone": name, "graft_held_out": graft["held_out_accuracy"],
                           "baseline_held_out": base["held_out_accuracy"],
                           "margin_points": round(100 * (graft["held_out_accuracy"] - base["held_out_accuracy"]), 2),
                           "graft_estimate": graft["reported"], "ci95": (graft["estimate"] or {}).get("ci95"),
                           "recipe": {k: (graft["recipe"] or {}).get(k) for k in ("strategy", "solver", "logistic_c",
                                                                                   "head", "tta_flip")},
                           "submit_to_ready_s": graft["submit_to_ready_s"], "baseline_s": base["seconds"],
                           "load_average_1_5_15": [round(v, 1) for v in os.getloadavg()]}
                    accuracy.append(row)
                    print(json.dumps(row), flush=True)
    result = {"machine": machine(), "throughput": speed, "accuracy": accuracy}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
