"""strategy "auto": a short search on the val split that picks the recipe for the user.

The search, in order (each candidate is an ordinary recipe; fields the user set are kept fixed,
and candidates that contradict them are skipped):

1. Head search on cached features (every device). The backbone's features of the train and val
   images, and of their mirror images, are computed once (two backbone passes); each candidate
   then trains only a head on them, which costs well under a second on a CPU:
     - the plain `linear_probe` defaults (linear head, lr 1e-3, no augmentation, no TTA) — first,
       so "auto" can never score below the linear probe on val;
     - linear head at lr 1e-3 and 3e-3, mlp head (512 ReLU units, dropout 0.2) at lr 1e-3, each
       trained on the images and their mirrors with test-time flip averaging.
2. Fine-tuning candidates, when the time budget has room for them (see `plan_fine_tuning`):
     - GPU: `fine_tune` at lr 5e-4 and 2e-4 (15 epochs, light augmentation, TTA), then `partial`
       (last 3 stages, lr 1e-3);
     - CPU: one `fine_tune` at lr 5e-4 with as many epochs (at least 8, at most 10) as the budget
       allows; with the default budget that means small images or small datasets only (a few
       hundred photos at 224 px need about a 5-minute budget).
   Whether a candidate runs, and for how many epochs, follows a fixed cost model (images/s per
   device type, below; the probes are costed by the same model, not timed), so the same job on
   the same kind of device makes the same choices.
   If the budget runs out anyway (a machine much slower than the model), the running
   candidate stops at the end of its epoch (its best epoch is kept) and the rest are skipped.
3. The winner is the candidate with the best val accuracy, ties to the lowest NLL after its
   temperature is fitted; it is calibrated like any model.

The chosen recipe (a complete, explicit config) is returned as the result's `recipe`, reported
in the job's progress (`auto_choice`) and in the model's metrics (`auto`: the choice and every
candidate's score and cost). Re-running that recipe as an explicit job gives the same model.
The winner is picked on the val split it is then scored on, so its val accuracy is optimistic by
up to the spread between candidates (about one image on hymenoptera's 153; every candidate's
score is in the report). A job that asks for what no probe can do (cutmix, strong augmentation,
bn_mode "train") gets a fine-tuning candidate even when the budget is short.
"""
from __future__ import annotations

import copy
import time

import torch
from pydantic import ValidationError
from torch import nn

from workers.config import TrainConfig
from workers.errors import JobError
from workers.training.contract import Control, NullControl, PreparedData, TrainResult
from workers.training.parts import adapt_batchnorm
from workers.training.probe import FeatureCache
from workers.training.recipe import train_recipe

# Seconds the search may spend when the job gives no time_budget_s. On a CPU the default keeps a
# job on a few hundred images under three minutes from submit.
DEFAULT_BUDGET_S = {"cpu": 150.0, "cuda": 600.0}
# The cost model for planning fine-tuning: training images/s (forward + backward, augmentation)
# and inference images/s of EfficientNet-Lite0 at 224 px, as measured (docs/benchmarks.md);
# scaled by (224 / image_size)^2 for other sizes.
TRAIN_IMAGES_PER_S = {"cpu": 12.0, "cuda": 800.0}
INFER_IMAGES_PER_S = {"cpu": 55.0, "cuda": 3000.0}
# Short fine-tunes lose to the probe: on hymenoptera at 224 px (CPU), 5 epochs of fine_tune gave
# 0.922 and of partial (3 stages) 0.935 val accuracy, against 0.954 for the linear probe.
MIN_FINE_TUNE_EPOCHS = 8
PROBE_SECONDS = 1.0

PROBE_GRID: list[dict] = [
    {"head": "linear", "learning_rate": 1e-3, "augmentation": "none", "tta_flip": False, "dropout": 0.0},
    {"head": "linear", "learning_rate": 1e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.0},
    {"head": "linear", "learning_rate": 3e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.0},
    {"head": "mlp", "learning_rate": 1e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.2},
]
FINE_TUNE_GRID: dict[str, list[dict]] = {
    "cuda": [
        {"strategy": "fine_tune", "learning_rate": 5e-4, "epochs": 15},
        {"strategy": "fine_tune", "learning_rate": 2e-4, "epochs": 15},
        {"strategy": "partial", "unfreeze_stages": 3, "learning_rate": 1e-3, "epochs": 15},
    ],
    "cpu": [{"strategy": "fine_tune", "learning_rate": 5e-4, "epochs": 10}],
}
_FINE_TUNE_COMMON = {"head": "linear", "augmentation": "light", "tta_flip": True, "dropout": 0.0}


def candidate(config: TrainConfig, overrides: dict) -> TrainConfig | None:
    """The user's config with the search's choices filled in where the user left None; None if
    the combination is invalid (e.g. the user asked for cutmix, which a linear probe cannot do)."""
    base = config.model_dump()
    user_set = {k for k, v in base.items() if v is not None}
    merged = {**base, **{k: v for k, v in overrides.items() if k not in user_set or k == "strategy"}}
    merged.pop("time_budget_s", None)
    if config.epochs is not None:
        merged["epochs"] = config.epochs
    if merged.get("unfreeze_stages") is not None and merged["strategy"] not in ("partial", "gradual"):
        merged["unfreeze_stages"] = None
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError:
        return None


def _unique(configs: list[TrainConfig | None]) -> list[TrainConfig]:
    out, seen = [], set()
    for c in configs:
        if c is not None and (key := c.model_dump_json()) not in seen:
            seen.add(key)
            out.append(c)
    return out


def _rates(config: TrainConfig, device_type: str) -> tuple[float, float]:
    scale = (224 / config.image_size) ** 2
    return TRAIN_IMAGES_PER_S[device_type] * scale, INFER_IMAGES_PER_S[device_type] * scale


def modelled_probe_seconds(config: TrainConfig, data: PreparedData, device_type: str, probes: int) -> float:
    """Two backbone passes (images and mirrors) over train + val, plus about a second per head."""
    if not probes:
        return 0.0
    _, infer_ips = _rates(config, device_type)
    return 2 * (len(data.train_y) + len(data.val_y)) / infer_ips + probes * PROBE_SECONDS


def plan_fine_tuning(config: TrainConfig, data: PreparedData, device_type: str, seconds_left: float,
                     min_epochs: int = MIN_FINE_TUNE_EPOCHS) -> list[TrainConfig]:
    """Fine-tuning candidates whose modelled cost fits in `seconds_left`, epochs cut to fit."""
    train_ips, infer_ips = _rates(config, device_type)
    out = []
    for overrides in FINE_TUNE_GRID[device_type]:
        c = candidate(config, {**_FINE_TUNE_COMMON, **overrides})
        if c is None:
            continue
        epoch_s = len(data.train_y) / train_ips + len(data.val_y) * (2 if c.tta_flip else 1) / infer_ips
        affordable = int(seconds_left // epoch_s)
        epochs = c.epochs if config.epochs is not None else min(c.epochs, affordable)
        if epochs < min_epochs or epochs * epoch_s > seconds_left:
            continue
        c = c.model_copy(update={"epochs": epochs})
        out.append(c)
        seconds_left -= epochs * epoch_s
    return out


def _score(result: TrainResult) -> tuple[float, float]:
    return (result.metrics["val_accuracy"], -result.metrics["val_loss"])


def train_auto(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
               control: Control, device: torch.device) -> TrainResult:
    started = time.perf_counter()
    device_type = "cuda" if device.type == "cuda" else "cpu"
    budget = config.time_budget_s or DEFAULT_BUDGET_S[device_type]
    deadline = started + budget
    fine_tune_grid = FINE_TUNE_GRID[device_type]
    pristine = copy.deepcopy(features.state_dict()) if fine_tune_grid else None

    probes = _unique([candidate(config, {"strategy": "linear_probe", **o}) for o in PROBE_GRID])
    results: list[tuple[TrainConfig, TrainResult, float]] = []
    if probes:
        if config.bn_mode == "adabn":
            adapt_batchnorm(features, data.train_x, data.preprocessing, device, control)
        cache = FeatureCache(features, data, device, control)
        for i, c in enumerate(probes, start=1):
            control.progress({"phase": "auto search", "candidate": i, "candidates": len(probes),
                              "trying": _describe(c)})
            t0 = time.perf_counter()
            results.append((c, train_recipe(c, data, features, feature_dim, _Quiet(control), device, cache),
                            time.perf_counter() - t0))
    # The plan uses the modelled cost of the probes, not their measured time: same job, same plan.
    seconds_left = budget - modelled_probe_seconds(config, data, device_type, len(probes))
    planned = plan_fine_tuning(config, data, device_type, seconds_left)
    if not probes and not planned:  # e.g. cutmix or strong augmentation asked for: fine-tuning only
        planned = plan_fine_tuning(config, data, device_type, max(seconds_left, 0), min_epochs=1)[:1]
        planned = planned or [c.model_copy(update={"epochs": 1})
                              for c in plan_fine_tuning(config, data, device_type, float("inf"))[:1]]
    skipped = []
    for c in planned:
        if time.perf_counter() > deadline and results:
            skipped.append(_describe(c))
            continue
        control.progress({"phase": "auto search", "trying": _describe(c)})
        tuned = copy.deepcopy(features)
        tuned.load_state_dict(pristine)
        t0 = time.perf_counter()
        results.append((c, train_recipe(c, data, tuned, feature_dim, control, device, deadline=deadline),
                        time.perf_counter() - t0))
    if not results:
        raise JobError("no_recipe", "strategy 'auto' found no recipe compatible with the options set on "
                       "this job; choose a strategy explicitly")
    best_config, best, _ = max(results, key=lambda r: _score(r[1]))
    report = {
        "chosen": best_config.model_dump(),
        "budget_s": budget, "search_seconds": round(time.perf_counter() - started, 3),
        "device": device_type, "selected_on": "val split: accuracy, then NLL after temperature scaling",
        "skipped_for_time": skipped,
        "candidates": [{"recipe": _describe(c), "val_accuracy": r.metrics["val_accuracy"],
                        "val_loss": r.metrics["val_loss"], "epochs_run": r.metrics["epochs_run"],
                        "stopped_by": r.metrics["stopped_by"],
                        "seconds": round(s, 3)} for c, r, s in results],
    }
    control.progress({"phase": "auto chose", "auto_choice": _describe(best_config)})
    seconds = time.perf_counter() - started
    backbone_images = (cache.images if probes else 0) + sum(
        r.metrics["train_images_per_s"] * r.metrics["train_seconds"] for c, r, _ in results
        if c.strategy != "linear_probe" and r.metrics["train_images_per_s"])
    metrics = {**best.metrics, "auto": report, "train_seconds": round(seconds, 3),
               "train_images_per_s": round(backbone_images / seconds, 1) if seconds and backbone_images else None}
    # Probes share `features`; a later candidate may have moved it: the winner goes back to CPU.
    return TrainResult(best.classifier.to("cpu").float(), metrics, best.history, best_config.model_dump())


def _describe(c: TrainConfig) -> dict:
    keys = ("strategy", "head", "learning_rate", "augmentation", "tta_flip", "dropout", "epochs",
            "unfreeze_stages")
    return {k: getattr(c, k) for k in keys if getattr(c, k) is not None}


class _Quiet(NullControl):
    """Per-epoch progress of each probe would flood the job's progress; pass stop requests only."""

    def __init__(self, control: Control):
        self.control = control

    def stop_if_asked(self) -> None:
        self.control.stop_if_asked()
