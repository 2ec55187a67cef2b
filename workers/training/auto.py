"""strategy "auto": a search that picks the recipe, trains it on every image it may, and reports
an accuracy that survives the choice.

Which images train and which choose depends on who made the val split:

- Graft made it (`PreparedData.val_given` False: the user uploaded labeled images only). Holding
  20% out would waste scarce images and score the choice on a small, noisy split. So the search
  pools train + val and cross-validates: stratified k folds (k = min(5, the smallest class's
  count), at least 2; `selection.stratified_folds`, fixed by the seed). Every candidate is
  trained k times, each time predicting the fold it did not see; the winner (best out-of-fold
  accuracy, ties to the lower NLL) is then refitted on all the images.
- The user gave it. It is used as the user meant it: candidates train on train and are chosen on
  val; `refit: true` then trains the winner on train + val (default false: the model never sees
  val, so its val metrics stay a held-out score).

The candidates (each an ordinary explicit recipe; fields the user set are kept fixed, and
candidates that contradict them are skipped):

1. Logistic regression heads on the frozen features (every device): full-batch multinomial
   logistic regression by L-BFGS on standardized features, trained on each image and its mirror,
   predicting with mirror averaging, for each L2 strength in `logistic.C_GRID` (solver "lbfgs").
   The backbone's features of every image and its mirror are computed once (two passes) and
   reused across folds, strengths and later jobs on the same images (probe.FeatureCache). With
   a user's val split the Adam-trained heads of old (`PROBE_GRID`) are tried too; under cross-
   validation they are not: they pick their best epoch on the split they are scored on, and on
   hymenoptera and bloodcells a logistic head beat or tied every one of them (docs/benchmarks.md).
2. On a CPU, fine-tuning the top of the network (strategy fine_tune_top: the last
   `TOP_STAGES` stages and the head, trained on activations cached once; workers/training/top.py),
   under the same folds, when the cost model says the folds and the refit fit in the budget. Its
   cache also gives the heads their features: one bottom pass for both. (With a user's val split
   it is not tried: the explicit strategy is there for that.)
3. When the job names no backbone: the same logistic heads on the frozen features of the other
   EfficientNet-Lites and the operator's backbones registered for auto (`auto_candidates()`; the
   images decoded again at each one's own resize and crop through `PreparedData.at_backbone`),
   under the same folds or on the same val split, while the cost model says their decoding,
   features and fits fit in what the budget has left. On hymenoptera Lite1/Lite2 features beat
   Lite0's by 1-2 points; on bloodcells (microscopy) the top fine-tune of Lite0 wins by far and
   leaves no budget for them (docs/benchmarks.md).
4. Fine-tuning the whole network or its last stages (GPU: three recipes; CPU: one, small data
   only) when the budget has room (`plan_fine_tuning`). These cost too much to train k + 1 times,
   so they are scored as before on the val split only, against the best cross-validated
   candidate's out-of-fold predictions there; a fine-tune that wins is the model (trained on train
   only, its estimate from val); if none wins, the cross-validated winner is refitted as above. On
   a CPU the top-of-network candidate (2.) replaces the whole-network one when it runs.
Work that is a pure function of the images, split, weights and recipe is kept for later jobs of
the worker process (CPU): the heads' features, the top's cached activations and its out-of-fold
logits, so a repeat job pays for the refit only.
Whether a candidate runs follows a fixed cost model (images/s per device type, below; nothing is
timed), so the same job on the same kind of device makes the same choices.

The headline `val_accuracy` is not the winner's selection score (optimistic: it was picked for
being high). It is the BBC-CV estimate (`selection.bbc_estimate`): bootstrap the images, repeat
the choice on the in-bag ones, score the choice on the out-of-bag ones; `estimate` holds it with
its 95% interval. Per-class metrics, the confusion matrix and the temperature come from the
winner's out-of-sample predictions (out of fold, or on val), and the refitted model carries that
temperature. The model's `trained_on` says which images trained it. A test split
(`PreparedData.test_x`) is never read here.

The chosen recipe (a complete, explicit config) is the result's `recipe`, reported in the job's
progress (`auto_choice`) and in the model's metrics (`auto`: the choice and every candidate's
score and time). Submitting it as an explicit job on the same train split gives the same model;
the refit is that recipe on train + val.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import nn

from workers.artifacts import Classifier, backbone_fingerprint
from workers.backbones import DEFAULT_BACKBONE, auto_candidates, get_backbone
from workers.config import TrainConfig
from workers.errors import JobError
import workers.training.logistic as logistic
import workers.training.selection as selection
import workers.training.semi as semi
from workers.training.contract import Control, NullControl, PreparedData, TrainResult
from workers.training.parts import adapt_batchnorm, calibrate_and_score, logits_of
from workers.training.probe import REUSED_FEATURES, FeatureCache
from workers.training.recipe import train_recipe

# Seconds the search may spend when the job gives no time_budget_s. On a CPU the default keeps a
# job on 1,500 images at 224 px under three minutes from submit.
DEFAULT_BUDGET_S = {"cpu": 150.0, "cuda": 600.0}
# The cost model (measured on an idle 2-core x86 VM and an H100-class GPU; docs/benchmarks.md).
# Training images/s of a whole-network fine-tune of EfficientNet-Lite0 at 224 px (forward +
# backward, augmentation), scaled by (224 / image_size)^2.
TRAIN_IMAGES_PER_S = {"cpu": 12.0, "cuda": 800.0}
# Frozen forward images/s of each backbone at its own input size (another size scales by the
# square of the ratio); a backbone not listed costs what Lite2 does.
INFER_IMAGES_PER_S = {
    "cpu": {"efficientnet_lite0": 110.0, "efficientnet_lite1": 85.0, "efficientnet_lite2": 50.0},
    "cuda": {"efficientnet_lite0": 3000.0, "efficientnet_lite1": 2200.0, "efficientnet_lite2": 1400.0},
}
DECODE_IMAGES_PER_S = 300.0  # decoding the images again for another backbone's resize (TorchCodec)
# fine_tune_top: images/s through the top TOP_STAGES stages of Lite0 at 224 px (cached
# activations). CPU: 256 training, measured inside a default job on bloodcells (2 cores, idle: its
# 5 folds and refit took 176 s; the bare loop reaches 340-390); predicting is a forward only,
# about three times as fast. GPU: not yet measured (no session had one; the 7x7 activations cross
# the host link each batch), set well below the whole-network rate's 10x. Every backbone, a ViT
# too (its cached tokens are larger and its blocks slower), is costed at Lite0's rates: not measured.
TOP_TRAIN_IMAGES_PER_S = {"cpu": 256.0, "cuda": 8000.0}
TOP_INFER_IMAGES_PER_S = {"cpu": 1500.0, "cuda": 20000.0}
TOP_STAGES = 2
# When the top's k folds do not fit the budget, it is cross-validated over this many (the heads
# keep their k): f folds and the refit train on f times the images per epoch, so 3 cost 3/5 of 5.
TOP_MIN_FOLDS = 3
# Short fine-tunes lose to the probe: on hymenoptera at 224 px (CPU), 5 epochs of fine_tune gave
# 0.922 and of partial (3 stages) 0.935 val accuracy, against 0.954 for the linear probe.
MIN_FINE_TUNE_EPOCHS = 8
# One logistic fit on 2 x 1,200 images x 1,280 features along a warm-started C path: 30 fits
# took 3.3 s on hymenoptera and 2.9 s on bloodcells (2 cores, shared).
HEAD_FIT_SECONDS = 0.15
PROBE_SECONDS = 1.0  # one Adam-trained head

LOGISTIC = {"head": "linear", "solver": "lbfgs", "augmentation": "light", "tta_flip": True, "dropout": 0.0}
PROBE_GRID: list[dict] = [
    {"head": "linear", "learning_rate": 1e-3, "augmentation": "none", "tta_flip": False, "dropout": 0.0},
    {"head": "linear", "learning_rate": 1e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.0},
    {"head": "linear", "learning_rate": 3e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.0},
    {"head": "mlp", "learning_rate": 1e-3, "augmentation": "light", "tta_flip": True, "dropout": 0.2},
]
ADAM = {"solver": "adamw"}
FINE_TUNE_GRID: dict[str, list[dict]] = {
    "cuda": [
        {"strategy": "fine_tune", "learning_rate": 5e-4, "epochs": 15},
        {"strategy": "fine_tune", "learning_rate": 2e-4, "epochs": 15},
        {"strategy": "partial", "unfreeze_stages": 3, "learning_rate": 1e-3, "epochs": 15},
    ],
    "cpu": [{"strategy": "fine_tune", "learning_rate": 5e-4, "epochs": 10}],
}
_FINE_TUNE_COMMON = {"head": "linear", "augmentation": "light", "tta_flip": True, "dropout": 0.0}
TOP_RECIPE = {"strategy": "fine_tune_top", "unfreeze_stages": TOP_STAGES, "head": "linear", "tta_flip": True,
              "dropout": 0.0}
_STAGED = ("partial", "gradual", "fine_tune_top")


def candidate(config: TrainConfig, overrides: dict) -> TrainConfig | None:
    """The user's config with the search's choices filled in where the user left None; None if
    the combination is invalid (e.g. the user asked for cutmix, which a linear probe cannot do)."""
    base = config.model_dump()
    user_set = {k for k, v in base.items() if v is not None}
    merged = {**base, **{k: v for k, v in overrides.items() if k not in user_set or k == "strategy"}}
    merged.pop("time_budget_s", None)
    merged.pop("refit", None)
    merged.pop("unlabeled", None)  # the search's, not a candidate's (workers/training/semi.py)
    if config.epochs is not None:
        merged["epochs"] = config.epochs
    if merged.get("unfreeze_stages") is not None and merged["strategy"] not in _STAGED:
        merged["unfreeze_stages"] = None
    if merged["strategy"] != "linear_probe":
        merged["solver"] = merged["logistic_c"] = None
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


def head_candidates(config: TrainConfig, cross_validated: bool, backbone: str | None = None) -> list[TrainConfig]:
    """Logistic heads over the C grid; with a user's val split, the Adam heads too. On the job's
    backbone, or on `backbone` when the job left it to the search."""
    common = {"strategy": "linear_probe", **({"backbone": backbone} if backbone else {})}
    heads = [candidate(config, {**common, **LOGISTIC, "logistic_c": c}) for c in logistic.C_GRID]
    if not cross_validated:
        heads += [candidate(config, {**common, **ADAM, **o}) for o in PROBE_GRID]
    return _unique(heads)


def _rates(config: TrainConfig, device_type: str) -> tuple[float, float]:
    """Training and frozen-inference images/s of `config`'s backbone at its image size."""
    spec = get_backbone(config.backbone or DEFAULT_BACKBONE)
    native = spec.preprocessing.input_size
    size = config.image_size or native
    infer = INFER_IMAGES_PER_S[device_type]
    infer_ips = infer.get(spec.name, infer["efficientnet_lite2"]) * (native / size) ** 2
    return TRAIN_IMAGES_PER_S[device_type] * (224 / size) ** 2, infer_ips


def modelled_probe_seconds(config: TrainConfig, data: PreparedData, device_type: str, heads: list[TrainConfig],
                           folds: int = 1, decode: bool = False) -> float:
    """Two backbone passes (images and mirrors) over train + val, plus the heads' fits (and the
    decoding, for a backbone whose images are decoded anew)."""
    if not heads:
        return 0.0
    _, infer_ips = _rates(heads[0], device_type)
    images = len(data.train_y) + len(data.val_y)
    fits = sum(HEAD_FIT_SECONDS if h.solver == "lbfgs" else PROBE_SECONDS for h in heads) * (folds + 1)
    return 2 * images / infer_ips + fits + (images / DECODE_IMAGES_PER_S if decode else 0.0)


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


def top_seconds(c: TrainConfig, images: int, folds: int, device_type: str) -> float:
    """Modelled cost of cross-validating fine_tune_top over `folds` folds and refitting it on all
    (the bottom pass is the heads' features, counted with them)."""
    scale = (224 / c.image_size) ** 2
    train_images = c.epochs * images * ((folds - 1) / folds * folds + 1)
    predicted = 2 * images  # each image out of fold, with its mirror
    return (train_images / (TOP_TRAIN_IMAGES_PER_S[device_type] * scale)
            + predicted / (TOP_INFER_IMAGES_PER_S[device_type] * scale))


def plan_top(config: TrainConfig, images: int, folds: int, device_type: str, seconds_left: float) -> TrainConfig | None:
    """The fine_tune_top candidate, when its backbone can be cut and its folds and refit fit in
    `seconds_left` by the cost model."""
    from workers.training.top import supports_top_tuning
    # AdaBN adapts the whole backbone for the heads, which the cached bottom would not see.
    spec = get_backbone(config.backbone or DEFAULT_BACKBONE)
    if config.bn_mode == "adabn" or not supports_top_tuning(spec):
        return None
    c = candidate(config, TOP_RECIPE)
    if c is None or top_seconds(c, images, folds, device_type) > seconds_left:
        return None
    return c


def _recipe_hash(c: TrainConfig, y: torch.Tensor, folds: torch.Tensor | None = None) -> str:
    """What a trained result depends on besides the pixels and weights (`_Search._reuse_key`): the
    recipe, the labels (a relabeled image keeps the pixels' key, and maybe the folds) and the folds."""
    folds_part = "" if folds is None else folds.tolist()
    return hashlib.sha256(f"{c.model_dump_json()}:{folds_part}:{y.tolist()}".encode()).hexdigest()


# --- the search -------------------------------------------------------------------------------

@dataclass
class Scored:
    """A candidate and its out-of-sample logits over the rows it was scored on."""

    config: TrainConfig
    logits: torch.Tensor
    rows: torch.Tensor  # indices into the pooled images (train, then val)
    seconds: float
    scored_on: str  # "out of fold" or "val"
    result: TrainResult | None = None  # a model trained on train only (holdout candidates)
    semi: bool = False  # self-trained on the dataset's unlabeled images too (workers/training/semi.py)
    ood_scores: torch.Tensor | None = None  # issue 17: fine_tune_top's out-of-fold "cosine" scores over rows


def train_auto(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
               control: Control, device: torch.device) -> TrainResult:
    started = time.perf_counter()
    device_type = "cuda" if device.type == "cuda" else "cpu"
    budget = config.time_budget_s or DEFAULT_BUDGET_S[device_type]
    search = _Search(config, data, features, feature_dim, control, device, device_type, budget, started)
    if data.val_given:
        return search.on_given_val()
    return search.cross_validated()


@dataclass
class _Frozen:
    """One backbone's side of the search: its pristine features, the images decoded for it, and
    its frozen features of every labeled image (train, then val) and of their mirrors."""

    name: str
    features: nn.Module
    feature_dim: int
    data: PreparedData
    x: torch.Tensor | None = None
    x_mirror: torch.Tensor | None = None
    acts: object | None = None  # top.StageActivations, when fine_tune_top runs on this backbone
    reused: bool = False
    weights: str | None = None  # sha256 of the features' state, once asked for (reuse keys)


class _Search:
    def __init__(self, config, data, features, feature_dim, control, device, device_type, budget, started):
        self.config, self.data, self.features, self.feature_dim = config, data, features, feature_dim
        self.control, self.device, self.device_type = control, device, device_type
        self.budget, self.started, self.deadline = budget, started, started + budget
        self.skipped: list[dict] = []
        self.backbone_images = 0
        self.y = torch.cat([data.train_y, data.val_y]).cpu()  # the pooled labels: train, then val
        self.val_rows = torch.arange(len(data.train_y), len(self.y))
        self.primary = _Frozen(config.backbone or DEFAULT_BACKBONE, features, feature_dim, data)
        self.frozen = {self.primary.name: self.primary}  # every backbone the search has features of
        self.semi_report: dict | None = None  # metrics.semi_supervised (issue 16)
        self._pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # backbone -> unlabeled features, mirrors

    # -- Graft's own split: cross-validate over every labeled image, refit the winner on all --------

    def cross_validated(self) -> TrainResult:
        config, data, y = self.config, self.data, self.y
        k = selection.fold_count(y)
        folds = selection.stratified_folds(y, k, config.seed)
        heads = head_candidates(config, cross_validated=True)
        seconds_left = self.budget - modelled_probe_seconds(config, data, self.device_type, heads, k)
        seconds_left -= self._semi_seconds(heads, k)
        forced = config.unlabeled == "pseudo_label" and self._pool_size() > 0  # issue 16: self-trained heads only
        top, top_k = None, k
        for top_k in dict.fromkeys((k, min(k, TOP_MIN_FOLDS))) if heads and not forced else ():
            if (top := plan_top(config, len(y), top_k, self.device_type, seconds_left)) is not None:
                break
        primary = self.primary
        if top is not None:
            seconds_left -= top_seconds(top, len(y), top_k, self.device_type)
            primary.acts = self._activations(top.unfreeze_stages)
            primary.x, primary.x_mirror = primary.acts.pooled(self.features)  # the heads' features, same pass
        elif heads:
            self._features(primary)
        scored = self._cv_heads(heads, primary, y, folds) if heads else []
        if top is not None:
            top_folds = folds if top_k == k else selection.stratified_folds(y, top_k, config.seed)
            scored.append(self._cv_top(top, primary.acts, y, top_folds))
        for name, other_heads, seconds_left in self._other_backbones(heads, seconds_left, k):
            if (other := self._frozen_at(name)) is not None:
                self._features(other)
                scored += self._cv_heads(other_heads, other, y, folds)
        if (semi_head := self._cv_semi(scored, y, folds)) is not None:
            scored.append(semi_head)
        # On a CPU fine-tuning the top supersedes a short whole-network fine-tune (cheaper, and
        # hymenoptera's 10-epoch fine_tune scored 0.84 on val where the top scored 0.96 out of fold).
        holdout = [] if (top is not None and self.device_type == "cpu") or forced else \
            self._holdout_fine_tunes(bool(scored), seconds_left)
        if not scored and not holdout:
            raise _no_recipe()
        cv_best = scored[selection.select([s.logits for s in scored], y)] if scored else None
        if forced and semi_head is not None:  # the user asked for pseudo-labels: the self-trained head is the model
            cv_best = semi_head
        best, selected_on = cv_best, f"{k}-fold stratified cross-validation over all {len(y)} labeled images"
        if top is not None and top_k != k:
            selected_on += f" ({top_k} folds for fine_tune_top, which {k} did not fit in the budget)"
        if holdout:  # the best cross-validated candidate against the fine-tunes, on the val images
            rows, target = self.val_rows, data.val_y.cpu()
            pool = [dataclasses.replace(cv_best, logits=cv_best.logits[rows], rows=rows)] if cv_best else []
            pool += holdout
            best = pool[selection.select([s.logits for s in pool], target)]
            selected_on += ", then against fine-tuning candidates on the val split (scored on it only)"
        if best.result is None:  # cross-validated: metrics and estimate over every image, out of fold; refit
            best, target = cv_best, y
            chose_from = [best] if forced and best.semi else scored
            estimate = {**selection.bbc_estimate([s.logits for s in chose_from], y, config.seed), "folds": k}
            classifier = self._refit_semi(best, y) if best.semi else self._refit(best.config, y)
            trained_on = {"images": len(y), "splits": ["train", "val"]}
        else:  # a fine-tune trained on train, chosen on val
            estimate = {**selection.bbc_estimate([s.logits for s in pool], target, config.seed), "folds": None}
            classifier, trained_on = best.result.classifier, {"images": len(data.train_y), "splits": ["train"]}
        metrics = self._metrics(classifier, best, target, estimate, trained_on)
        if self.semi_report is not None:
            metrics["semi_supervised"] = self.semi_report
        report = self._report(best.config, scored + holdout, selected_on)
        if heads and top is None:
            metrics["features_reused"] = all(f.reused for f in self.frozen.values())
        return self._result(classifier, metrics, report, best)

    # -- the unlabeled images (issue 16): self-training of the best logistic head ---------------------

    def _pool_size(self) -> int:
        if self.data.unlabeled_x is None or self.config.unlabeled == "ignore" or getattr(self.data, "multi_label", False):
            return 0
        return len(self.data.unlabeled_x)

    def _semi_seconds(self, heads: list[TrainConfig], folds: int) -> float:
        """Modelled cost of the unlabeled images' features and the self-training fits (per fold: two
        inner calibration fits and a fit per round, on labeled + pseudo-labeled rows)."""
        pool = self._pool_size()
        if not pool or not heads:
            return 0.0
        _, infer_ips = _rates(heads[0], self.device_type)
        labeled = max(1, len(self.y))
        return 2 * pool / infer_ips + (3 + semi.ROUNDS) * (folds + 1) * HEAD_FIT_SECONDS * (1 + pool / labeled)

    def _pool_features(self, side: _Frozen) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone's features of the unlabeled images and of their mirrors (kept for later jobs
        of this process on a CPU, as the labeled images' are)."""
        if side.name in self._pools:
            return self._pools[side.name]
        data = side.data
        pool_x = data.unlabeled_x
        key = None
        if data.source_key is not None and data.unlabeled_ids:
            key = hashlib.sha256(f"{data.source_key}:unlabeled:{','.join(data.unlabeled_ids)}".encode()).hexdigest()
        pool_data = dataclasses.replace(data, train_x=pool_x, train_y=torch.zeros(len(pool_x), dtype=torch.long),
                                        val_x=pool_x[:0], val_y=torch.zeros(0, dtype=torch.long), source_key=key,
                                        unlabeled_x=None, unlabeled_ids=None, at_backbone=None)
        cache = FeatureCache(side.features, pool_data, self.device, self.control, mirrors=("train",))
        self.backbone_images += cache.images
        self._pools[side.name] = (cache.train.float().cpu(), cache.mirror("train").float().cpu())
        return self._pools[side.name]

    def _self_trainable(self, scored: list[Scored]) -> list[Scored]:
        """The logistic heads among `scored` that self-training starts from; none without unlabeled
        images, or (the report then says why) without such a head."""
        if not (pool_size := self._pool_size()):
            return []
        heads = [s for s in scored if s.config.solver == "lbfgs" and s.config.strategy == "linear_probe"]
        if not heads:
            self.semi_report = {"used": False, "unlabeled_images": pool_size,
                                "reason": "no logistic head among the candidates to self-train"}
        return heads

    def _cv_semi(self, scored: list[Scored], y: torch.Tensor, folds: torch.Tensor) -> Scored | None:
        """The best cross-validated logistic head, self-trained on the unlabeled images in each fold
        (workers/training/semi.py): one more candidate, scored out of fold on labeled images only."""
        if not (heads := self._self_trainable(scored)):
            return None
        pool_size = self._pool_size()
        base = heads[selection.select([s.logits for s in heads], y)]
        c, side, k = base.config, self.frozen[base.config.backbone], int(folds.max()) + 1
        pool, pool_mirror = self._pool_features(side)
        light = c.augmentation == "light"
        self.control.progress({"phase": "auto search: self-training", "backbone": side.name, "unit": "folds",
                               "done": 0, "total": k, "candidate": _describe(c), "unlabeled_images": pool_size})
        t0 = time.perf_counter()
        logits = semi.out_of_fold(side.x, side.x_mirror if light else None, y, folds, pool,
                                  pool_mirror if light else None, len(self.data.classes), c.logistic_c,
                                  balanced=c.class_weighting == "balanced", tta=bool(c.tta_flip), seed=self.config.seed)
        self.control.stop_if_asked()
        scored_semi = Scored(c, logits, torch.arange(len(y)), time.perf_counter() - t0, "out of fold", semi=True)
        supervised, self_trained = selection.score(base.logits, y)[0], selection.score(logits, y)[0]
        self.semi_report = {"used": False, "unlabeled_images": pool_size, "candidate": _describe(c),
                            "out_of_fold_accuracy": {"supervised": round(supervised, 6),
                                                     "self_trained": round(self_trained, 6)},
                            "reason": "cross-validation preferred another candidate"}
        return self._finished([scored_semi], phase="auto search: self-training", backbone=side.name, done=k)[0]

    def _val_semi(self, scored: list[Scored], caches: dict[str, FeatureCache]) -> Scored | None:
        """With a val split you gave: the best logistic head on val, self-trained on the train images
        and the unlabeled ones, scored on val (which it never trains or calibrates on)."""
        if not (heads := self._self_trainable(scored)):
            return None
        pool_size = self._pool_size()
        target = self.data.val_y.cpu()
        base = heads[selection.select([s.logits for s in heads], target)]
        c, side = base.config, self.frozen[base.config.backbone]
        cache = caches[side.name]
        pool, pool_mirror = self._pool_features(side)
        light = c.augmentation == "light"
        self.control.progress({"phase": "auto search: self-training", "backbone": side.name, "unit": "candidates",
                               "done": 0, "total": 1, "candidate": _describe(c), "unlabeled_images": pool_size})
        t0 = time.perf_counter()
        trained = semi.self_train(cache.train.float().cpu(), cache.mirror("train").float().cpu() if light else None,
                                  side.data.train_y.cpu(), pool, pool_mirror if light else None,
                                  len(self.data.classes), c.logistic_c, c.class_weighting == "balanced", self.config.seed)
        logits = logistic.head_logits(trained.fit, cache.val.float().cpu(),
                                      cache.mirror("val").float().cpu() if c.tta_flip else None)
        classifier = logistic_classifier(side.features, side.feature_dim, trained.fit, c)
        result = TrainResult(classifier, {"best_epoch": 1, "epochs_run": 1}, [], c.model_dump())
        scored_semi = Scored(c, logits, self.val_rows, time.perf_counter() - t0, "val", result, semi=True)
        self._semi_trained = semi.summary(trained, self.data.classes, pool_size)
        self.semi_report = {"used": False, "unlabeled_images": pool_size, "candidate": _describe(c),
                            "val_accuracy": {"supervised": round(selection.score(base.logits, target)[0], 6),
                                             "self_trained": round(selection.score(logits, target)[0], 6)},
                            "reason": "the val split preferred another candidate"}
        return self._finished([scored_semi], phase="auto search: self-training", backbone=side.name, done=1)[0]

    def _refit_semi(self, best: Scored, y: torch.Tensor, cache: FeatureCache | None = None) -> Classifier:
        """The self-trained winner refitted on every labeled image and the whole unlabeled pool (the
        labeled images' features from `cache` when the split was yours: train, then val)."""
        c, side = best.config, self.frozen[best.config.backbone]
        pool, pool_mirror = self._pool_features(side)
        x, x_mirror = side.x, side.x_mirror
        if cache is not None:
            x = torch.cat([cache.train, cache.val]).float().cpu()
            x_mirror = torch.cat([cache.mirror("train"), cache.mirror("val")]).float().cpu()
        self.control.progress({"phase": "auto refit", "backbone": c.backbone, "images": len(y),
                               "unlabeled_images": len(pool), "candidate": _describe(c)})
        light = c.augmentation == "light"
        trained = semi.self_train(x, x_mirror if light else None, y, pool, pool_mirror if light else None,
                                  len(self.data.classes), c.logistic_c, c.class_weighting == "balanced",
                                  self.config.seed)
        kept = {k: v for k, v in (self.semi_report or {}).items()
                if k in ("candidate", "out_of_fold_accuracy", "val_accuracy")}
        self.semi_report = {**semi.summary(trained, self.data.classes, len(pool)), **kept}
        return logistic_classifier(side.features, side.feature_dim, trained.fit, c)

    def _other_backbones(self, heads: list[TrainConfig], seconds_left: float, folds: int = 1):
        """(backbone, its head candidates, seconds left after it) for each backbone auto may also
        try: only when the job left the backbone to the search, and while the cost model says the
        decoding, the features and the heads' fits still fit in the budget."""
        if self.config.backbone is not None or self.data.at_backbone is None or not heads:
            return
        for name in auto_candidates():  # the Lites, then the operator's backbones registered for auto
            if name == self.primary.name:
                continue
            other_heads = head_candidates(self.config, cross_validated=folds > 1, backbone=name)
            cost = modelled_probe_seconds(other_heads[0], self.data, self.device_type, other_heads, folds, decode=True)
            if cost > seconds_left:
                self.skipped.append({"backbone": name, "modelled_seconds": round(cost, 1)})
                continue
            seconds_left -= cost
            yield name, other_heads, seconds_left

    def _frozen_at(self, name: str) -> _Frozen | None:
        """Another backbone's side: the job's images decoded for it, with labels and splits checked
        against this data's (None when its weights are not on this machine)."""
        from workers.backbones import WeightsUnavailable
        self.control.progress({"phase": "decoding images", "backbone": name})
        try:
            data, features = self.data.at_backbone(name)
        except WeightsUnavailable as exc:
            self.skipped.append({"backbone": name, "reason": str(exc)})
            return None
        data = dataclasses.replace(data, test_x=None, test_y=None, at_backbone=None).on(self.device)
        if not (torch.equal(data.train_y.cpu(), self.data.train_y.cpu()) and torch.equal(data.val_y.cpu(), self.data.val_y.cpu())):
            raise RuntimeError(f"the images decoded for {name} are not the same labeled images in the same order")
        features.to(self.device)
        self.frozen[name] = _Frozen(name, features, get_backbone(name).feature_dim, data)
        return self.frozen[name]

    def _features(self, side: _Frozen) -> None:
        """A backbone's features of every labeled image (train, then val) and of their mirrors."""
        if self.config.bn_mode == "adabn":
            adapt_batchnorm(side.features, side.data.train_x, side.data.preprocessing, self.device, self.control)
        cache = FeatureCache(side.features, side.data, self.device, self.control, mirrors=("train", "val"))
        side.x = torch.cat([cache.train, cache.val]).cpu()
        side.x_mirror = torch.cat([cache.mirror("train"), cache.mirror("val")]).cpu()
        side.reused = cache.reused
        self.backbone_images += cache.images

    def _reuse_key(self, side: _Frozen, what: str) -> str | None:
        """Where this process keeps `what` of these pixels, split and backbone weights for later jobs
        (CPU only, as for the heads' features): a repeat job skips the bottom pass and the top's folds."""
        if self.device.type != "cpu":
            return None
        if side.weights is None:
            side.weights = backbone_fingerprint(side.features.state_dict())
        key = REUSED_FEATURES.key(side.data, side.weights)
        return key and f"{key}:{what}"

    def _activations(self, k: int):
        from workers.training.top import StageActivations
        spec = get_backbone(self.primary.name)
        key = self._reuse_key(self.primary, f"activations:{k}")
        if key and (entry := REUSED_FEATURES.get(key)) is not None:
            return StageActivations(entry["acts"], entry["acts_mirror"], spec, int(entry["k"]))
        pooled_x = self.data.labeled_x()  # a view of the decoded images' map, not a copy
        acts = StageActivations.compute(self.features, spec, pooled_x, self.data.preprocessing, k, self.device,
                                        self.control)
        self.backbone_images += 2 * len(pooled_x)
        if key:
            REUSED_FEATURES.put(key, {"acts": acts.acts, "acts_mirror": acts.acts_mirror, "k": torch.tensor(acts.k)})
        return acts

    def _cv_heads(self, heads: list[TrainConfig], side: _Frozen, y, folds) -> list[Scored]:
        """Out-of-fold logits of every head on one backbone's features: per fold, one
        standardization and a warm-started path along the C grid (heads sharing augmentation and
        class weighting share the path)."""
        x, x_mirror = side.x, side.x_mirror
        n, k = len(y), int(folds.max()) + 1
        logits = [torch.zeros(n, len(self.data.classes)) for _ in heads]
        seconds = [0.0] * len(heads)
        groups: dict[tuple, list[int]] = {}
        for i, h in enumerate(heads):
            groups.setdefault((h.augmentation, h.class_weighting, h.tta_flip), []).append(i)
        for f in range(k):
            self.control.progress({"phase": "auto search: logistic heads", "backbone": side.name, "unit": "folds",
                                   "done": f, "total": k, "fold": f + 1, "candidates": len(heads)})
            fit_rows, out_rows = folds != f, folds == f
            for (augmentation, weighting, tta), members in groups.items():
                t0 = time.perf_counter()
                # The fold's copies go once the path has standardized them, and each path before the
                # next is built: at 20,000 images a path's float64 features are 330 MB.
                mirror = x_mirror[fit_rows] if augmentation == "light" else None
                path = logistic.LogisticPath(*logistic.training_set(x[fit_rows], y[fit_rows], mirror),
                                             len(self.data.classes), weighting == "balanced")
                del mirror
                for i in sorted(members, key=lambda i: heads[i].logistic_c):
                    fit = path.fit(heads[i].logistic_c)
                    logits[i][out_rows] = logistic.head_logits(fit, x[out_rows], x_mirror[out_rows] if tta else None)
                    self.control.stop_if_asked()
                del path
                share = (time.perf_counter() - t0) / len(members)
                for i in members:
                    seconds[i] += share
        rows = torch.arange(n)
        return self._finished([Scored(h, logits[i], rows, seconds[i], "out of fold") for i, h in enumerate(heads)],
                              done=k)

    def _cv_top(self, c: TrainConfig, acts, y, folds) -> Scored:
        """The top's out-of-fold logits: a deterministic function of the recipe, the folds, the
        images and the weights, so an earlier job's are reused."""
        from workers.ood import fold_cosine_scores
        from workers.training.top import fit_top, top_outputs
        spec = get_backbone(c.backbone)
        n, k = len(y), int(folds.max()) + 1
        key = self._reuse_key(self.primary, f"out-of-fold:{_recipe_hash(c, y, folds)}")
        if key and (entry := REUSED_FEATURES.get(key)) is not None:
            return self._finished([Scored(c, entry["logits"], torch.arange(n), 0.0, "out of fold",
                                          ood_scores=entry.get("ood_scores"))],
                                  phase="auto search: fine_tune_top", unit="folds", done=k, total=k,
                                  candidate=_describe(c), reused=True)[0]
        logits, ood_scores = torch.zeros(n, len(self.data.classes)), torch.zeros(n)
        t0 = time.perf_counter()
        for f in range(k):
            self.control.progress({"phase": "auto search: fine_tune_top", "unit": "folds", "done": f, "total": k,
                                   "fold": f + 1, "candidate": _describe(c)})
            fit_idx, out_idx = torch.nonzero(folds != f).flatten(), torch.nonzero(folds == f).flatten()
            model = fit_top(c, self.features, spec, acts, fit_idx, y[fit_idx], len(self.data.classes),
                            _Quiet(self.control), self.device)
            logits[out_idx], out_feats = top_outputs(model, spec, acts.k, acts, out_idx, bool(c.tta_flip))
            # Issue 17: the fold's model scores its held-out images against its own training features.
            fit_feats = top_outputs(model, spec, acts.k, acts, fit_idx, bool(c.tta_flip))[1]
            ood_scores[out_idx] = fold_cosine_scores(fit_feats, y[fit_idx].cpu(), out_feats, self.data.classes)
        if key:
            REUSED_FEATURES.put(key, {"logits": logits, "ood_scores": ood_scores})
        return self._finished([Scored(c, logits, torch.arange(n), time.perf_counter() - t0, "out of fold",
                                      ood_scores=ood_scores)], done=k)[0]

    def _holdout_fine_tunes(self, have_others: bool, seconds_left: float) -> list[Scored]:
        """Fine-tuning candidates that fit the budget, trained on train and scored on val."""
        planned = plan_fine_tuning(self.config, self.data, self.device_type, seconds_left)
        if not have_others and not planned:  # e.g. cutmix or strong augmentation asked for: fine-tuning only
            planned = plan_fine_tuning(self.config, self.data, self.device_type, max(seconds_left, 0), min_epochs=1)[:1]
            planned = planned or [c.model_copy(update={"epochs": 1})
                                  for c in plan_fine_tuning(self.config, self.data, self.device_type,
                                                            float("inf"))[:1]]
        if not planned:
            return []
        pristine = copy.deepcopy(self.features.state_dict())
        out = []
        for c in planned:
            if time.perf_counter() > self.deadline and (out or have_others):
                self.skipped.append(_describe(c))
                continue
            self.control.progress({"phase": "auto search: fine-tuning", "unit": "candidates", "done": len(out),
                                   "total": len(planned), "candidate": _describe(c)})
            tuned = copy.deepcopy(self.features)
            tuned.load_state_dict(pristine)
            t0 = time.perf_counter()
            result = train_recipe(c, self.data, tuned, self.feature_dim, self.control, self.device,
                                  deadline=self.deadline)
            val_logits = logits_of(result.classifier.to(self.device), self.data.val_x, self.data.preprocessing,
                                   self.device, self.control, bool(c.tta_flip))
            result.classifier.to("cpu")
            self.backbone_images += int((result.metrics["train_images_per_s"] or 0) * result.metrics["train_seconds"])
            out.append(self._finished([Scored(c, val_logits, self.val_rows, time.perf_counter() - t0, "val", result)],
                                      phase="auto search: fine-tuning", done=len(out) + 1)[0])
        return out

    def _refit(self, c: TrainConfig, y) -> Classifier:
        """The winner trained on every labeled image."""
        self.control.progress({"phase": "auto refit", "backbone": c.backbone, "images": len(y), "candidate": _describe(c)})
        side = self.frozen[c.backbone]
        if c.strategy == "fine_tune_top":
            return self._refit_top(c, side, y)
        # The training set (every image and its mirror) goes once the path has standardized it.
        mirror = side.x_mirror if c.augmentation == "light" else None
        path = logistic.LogisticPath(*logistic.training_set(side.x, y, mirror), len(self.data.classes),
                                     c.class_weighting == "balanced")
        fit = path.fit(c.logistic_c)
        return logistic_classifier(side.features, side.feature_dim, fit, c)

    def _refit_top(self, c: TrainConfig, side: _Frozen, y: torch.Tensor) -> Classifier:
        """fine_tune_top trained on every labeled image: deterministic in the recipe, the labels and
        the activations, so a repeat job takes the weights an earlier one trained (bit-identical)."""
        from workers.training.top import fit_top, top_classifier
        spec, n_classes = get_backbone(c.backbone), len(self.data.classes)
        key = self._reuse_key(side, f"refit:{_recipe_hash(c, y)}")
        if key and (entry := REUSED_FEATURES.get(key)) is not None:
            classifier = top_classifier(c, side.features, spec, n_classes).to("cpu").float()
            classifier.load_state_dict(entry)
            classifier.tta_flip = bool(c.tta_flip)
            for p in classifier.parameters():
                p.requires_grad_(False)
            return classifier.eval()
        classifier = fit_top(c, side.features, spec, side.acts, torch.arange(len(y)), y, n_classes,
                             _Quiet(self.control), self.device).to("cpu").float()
        if key:
            REUSED_FEATURES.put(key, {name: t.clone() for name, t in classifier.state_dict().items()})
        return classifier

    # -- the user's own split: choose on val, train on train (or train + val with refit) -------------

    def on_given_val(self) -> TrainResult:
        config, data = self.config, self.data
        heads = head_candidates(config, cross_validated=False)
        caches: dict[str, FeatureCache] = {}
        scored = self._val_heads(heads, self.primary, caches) if heads else []
        seconds_left = self.budget - modelled_probe_seconds(config, data, self.device_type, heads)
        for name, other_heads, seconds_left in self._other_backbones(heads, seconds_left):
            if (other := self._frozen_at(name)) is not None:
                scored += self._val_heads(other_heads, other, caches)
        forced = config.unlabeled == "pseudo_label" and self._pool_size() > 0  # issue 16
        if (semi_head := self._val_semi(scored, caches)) is not None:
            scored.append(semi_head)
        if not forced:
            scored += self._holdout_fine_tunes(bool(heads), seconds_left)
        if not scored:
            raise _no_recipe()
        target = data.val_y.cpu()
        best = scored[selection.select([s.logits for s in scored], target)]
        if forced and semi_head is not None:  # the user asked for pseudo-labels: the self-trained head is the model
            best = semi_head
        estimate = selection.bbc_estimate([s.logits for s in ([best] if forced and best.semi else scored)], target,
                                          config.seed)
        estimate["folds"] = None
        refit = bool(config.refit)
        if refit and best.semi:
            classifier = self._refit_semi(best, torch.cat([data.train_y, data.val_y]).cpu(), caches[best.config.backbone])
            trained_on = {"images": len(data.train_y) + len(data.val_y), "splits": ["train", "val"]}
        elif refit:
            classifier = self._refit_on_train_and_val(best, caches.get(best.config.backbone))
            trained_on = {"images": len(data.train_y) + len(data.val_y), "splits": ["train", "val"]}
        else:
            classifier = best.result.classifier
            trained_on = {"images": len(data.train_y), "splits": ["train"]}
            if best.semi:
                self.semi_report = {**self._semi_trained, **{k: v for k, v in self.semi_report.items()
                                                           if k in ("candidate", "val_accuracy")}}
        metrics = self._metrics(classifier, best, target, estimate, trained_on)
        report = self._report(best.config, scored, "the val split you gave")
        if self.semi_report is not None:
            metrics["semi_supervised"] = self.semi_report
        if caches:
            metrics["features_reused"] = all(c.reused for c in caches.values())
        return self._result(classifier, metrics, report, best)

    def _val_heads(self, heads: list[TrainConfig], side: _Frozen, caches: dict[str, FeatureCache]) -> list[Scored]:
        """Each head trained on one backbone's train features, scored on its val features."""
        if self.config.bn_mode == "adabn":
            adapt_batchnorm(side.features, side.data.train_x, side.data.preprocessing, self.device, self.control)
        cache = caches[side.name] = FeatureCache(side.features, side.data, self.device, self.control,
                                                 mirrors=("train", "val"))
        self.backbone_images += cache.images
        out = []
        for i, c in enumerate(heads, start=1):
            self.control.progress({"phase": "auto search: heads", "backbone": side.name, "unit": "candidates",
                                   "done": i - 1, "total": len(heads), "candidate": _describe(c)})
            t0 = time.perf_counter()
            result = train_recipe(c, side.data, side.features, side.feature_dim, _Quiet(self.control), self.device,
                                  cache)
            out.append(self._finished([Scored(c, _head_val_logits(result.classifier, cache, c), self.val_rows,
                                              time.perf_counter() - t0, "val", result)],
                                      phase="auto search: heads", backbone=side.name, done=i)[0])
        return out

    def _refit_on_train_and_val(self, best: Scored, cache: FeatureCache | None) -> Classifier:
        c, side = best.config, self.frozen[best.config.backbone]
        data = side.data
        self.control.progress({"phase": "auto refit", "backbone": c.backbone, "candidate": _describe(c)})
        if c.solver == "lbfgs" and cache is not None:
            y = torch.cat([data.train_y, data.val_y]).cpu()
            x = torch.cat([cache.train, cache.val]).cpu()
            mirror = torch.cat([cache.mirror("train"), cache.mirror("val")]).cpu() if c.augmentation == "light" else None
            train_x, train_y = logistic.training_set(x, y, mirror)
            fit = logistic.fit_logistic(train_x, train_y, len(data.classes), c.logistic_c,
                                        balanced=c.class_weighting == "balanced")
            return logistic_classifier(side.features, side.feature_dim, fit, c)
        # Epoch-trained recipes: as many epochs as the winner's best, on train + val (no val left to
        # stop on, so the last epoch is kept by scoring on the training images themselves).
        pooled = dataclasses.replace(data, train_x=data.labeled_x(),
                                     train_y=torch.cat([data.train_y, data.val_y]), source_key=None)
        epochs = best.result.metrics["best_epoch"] or c.epochs
        features = side.features
        if c.strategy != "linear_probe":
            features = copy.deepcopy(side.features)
        return train_recipe(c.model_copy(update={"epochs": epochs}), pooled, features, side.feature_dim,
                            _Quiet(self.control), self.device).classifier

    # -- what the model reports ------------------------------------------------------------------

    def _metrics(self, classifier: Classifier, best: Scored, target: torch.Tensor, estimate: dict,
                 trained_on: dict) -> dict:
        """Per-class metrics and calibration from the winner's out-of-sample logits; the headline
        accuracy from the selection-corrected estimate."""
        metrics = calibrate_and_score(classifier, best.logits, target, self.data.classes)
        metrics["calibration"]["method"] = f"temperature scaling, fitted on the {best.scored_on} predictions"
        classifier.tta_flip = bool(best.config.tta_flip)
        metrics["selection_accuracy"] = metrics["val_accuracy"]  # the winner's own score: optimistic
        metrics["val_accuracy"] = estimate["accuracy"]
        metrics["estimate"] = {**estimate, "predictions": best.scored_on}
        metrics["trained_on"] = trained_on
        metrics["num_train_images"] = trained_on["images"]
        if best.result is not None and trained_on["splits"] == ["train"]:
            run = best.result.metrics
        else:  # refitted for the recipe's epochs (a logistic fit is one)
            epochs = 1 if best.config.solver == "lbfgs" else best.config.epochs
            run = {"best_epoch": epochs, "epochs_run": epochs}
        metrics.update(best_epoch=run.get("best_epoch"), epochs_run=run.get("epochs_run"),
                       stopped_early=run.get("stopped_early", False), stopped_by=run.get("stopped_by"))
        return metrics

    def _report(self, chosen: TrainConfig, scored: list[Scored], selected_on: str) -> dict:
        def entry(s: Scored) -> dict:
            acc, neg_nll = selection.score(s.logits, self.y[s.rows])
            return {"recipe": _describe(s.config), "val_accuracy": round(acc, 6), "val_loss": round(-neg_nll, 6),
                    "scored_on": s.scored_on, "images": len(s.rows), "seconds": round(s.seconds, 3),
                    **({"unlabeled": "pseudo_label"} if s.semi else {})}
        return {"chosen": chosen.model_dump(), "budget_s": self.budget,
                "search_seconds": round(time.perf_counter() - self.started, 3), "device": self.device_type,
                "selected_on": selected_on + "; accuracy, then NLL", "skipped_for_time": self.skipped,
                "candidates": [entry(s) for s in scored]}

    def _finished(self, scored: list[Scored], **update) -> list[Scored]:
        """Report candidates just scored, each as the model's `auto.candidates` lists it: they join
        the job's leaderboard. `update` is the rest of the report (their phase's done, or the phase
        itself when a candidate's training reported another). Every phase reports in the shape of
        workers/progress.py: phase, unit, done, total, and `backbone`, `candidate` (the recipe
        being tried, as `_describe` gives it) where they apply. Returns `scored`."""
        entries = self._report(scored[0].config, scored, "")["candidates"]  # one home for an entry's fields
        self.control.progress({**update, "finished": entries})
        return scored

    def _result(self, classifier: Classifier, metrics: dict, report: dict, best: Scored) -> TrainResult:
        self.control.progress({"phase": "auto chose", "auto_choice": _describe(best.config)})
        seconds = time.perf_counter() - self.started
        metrics.update(auto=report, train_seconds=round(seconds, 3),
                       train_images_per_s=round(self.backbone_images / seconds, 1)
                       if seconds and self.backbone_images else None)
        history = best.result.history if best.result else []
        chosen = self.frozen[best.config.backbone]
        pre = None if chosen is self.primary else chosen.data.preprocessing
        # Probes share `features`; a later candidate may have moved it: the winner goes back to CPU.
        result = TrainResult(classifier.to("cpu").float(), metrics, history, best.config.model_dump(), pre)
        # Issue 19: the winner's out-of-sample logits over its rows are the model's held-out predictions.
        from workers.training.contract import HeldOut
        result.held_out = HeldOut(best.logits.float().cpu(), self.y[best.rows], best.rows.cpu(), best.scored_on,
                                  features=self._served_features(best, chosen, result.classifier),
                                  feature_scores=best.ood_scores)
        return result

    def _served_features(self, best: Scored, chosen: _Frozen, classifier: Classifier) -> torch.Tensor | None:
        """Issue 17: the pooled features the winner's head reads (as served), for its OOD score: the
        frozen ones of a head, the final network's of fine_tune_top (its folds scored the held-out
        images); None for another tuned backbone."""
        if best.config.strategy == "fine_tune_top" and best.ood_scores is not None and chosen.acts is not None:
            from workers.training.top import top_outputs
            return top_outputs(classifier, get_backbone(best.config.backbone), chosen.acts.k, chosen.acts,
                               torch.arange(len(self.y)), bool(best.config.tta_flip))[1]
        if best.config.strategy != "linear_probe":
            return None
        if best.result is not None and best.result.held_out is not None:
            return best.result.held_out.features  # chosen on the user's val split: train_recipe's cache
        if chosen.x is None:
            return None
        from workers.ood import served_features
        return served_features(chosen.x, chosen.x_mirror if best.config.tta_flip else None)


def logistic_classifier(features: nn.Module, feature_dim: int, fit: logistic.LinearMap, c: TrainConfig) -> Classifier:
    """A Classifier whose linear head is the fitted logistic regression (the backbone shared, as a
    linear probe's)."""
    classifier = Classifier(features, feature_dim, fit.weight.shape[0], head="linear")
    fit.load_into(classifier.head)
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    classifier.tta_flip = bool(c.tta_flip)
    return classifier.eval()


@torch.no_grad()
def _head_val_logits(classifier: Classifier, cache: FeatureCache, c: TrainConfig) -> torch.Tensor:
    """A head's val logits as train_recipe scored them (mirror-averaged when tta_flip)."""
    head = classifier.to(cache.val.device)
    logits = head.head_logits(cache.val).float()
    if c.tta_flip:
        logits = (logits + head.head_logits(cache.mirror("val")).float()) / 2
    classifier.to("cpu")
    return logits.cpu()


def _no_recipe() -> JobError:
    return JobError("no_recipe", "strategy 'auto' found no recipe compatible with the options set on this job; "
                    "choose a strategy explicitly")


def _describe(c: TrainConfig) -> dict:
    keys = ("backbone", "strategy", "head", "solver", "logistic_c", "learning_rate", "augmentation", "tta_flip", "dropout",
            "epochs", "unfreeze_stages")
    out = {k: getattr(c, k) for k in keys if getattr(c, k) is not None}
    if c.solver == "lbfgs":  # no epochs or rate: one deterministic fit
        out.pop("epochs", None)
        out.pop("learning_rate", None)
    return out


class _Quiet(NullControl):
    """Per-epoch progress of each candidate would flood the job's progress; pass stop requests only."""

    def __init__(self, control: Control):
        self.control = control

    def stop_if_asked(self) -> None:
        self.control.stop_if_asked()
