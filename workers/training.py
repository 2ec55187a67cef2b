"""Training as plain functions over explicit objects: data in, best classifier and metrics out.

`train` runs one recipe (or, for strategy "auto", the search in workers/auto.py that picks one):

- linear_probe: backbone frozen; its features are computed once (`FeatureCache`) and the head is
  fitted on them. Augmentation "light" adds each training image's mirror to the cache.
- fine_tune / partial / gradual: the head and some backbone stages train on augmented images;
  `unfreeze_plan` says how many stages (counted from the output) train in each epoch, and
  `stage_param_groups` gives each stage its own rate (`lr_stage_factor`).

Every strategy honours `bn_mode` (BatchNorm running statistics frozen, batch statistics in trained
stages, or AdaBN re-estimation before training), keeps the best epoch by `monitor` (early stopping
after `patience` epochs without improvement), then fits a temperature on the val logits; the
classifier carries that temperature and `tta_flip` to the artifact and to /predict.

The epoch loops hold explicit optimizer, scheduler and torch.Generator objects (the generator
draws batches and augmentation; torch's global RNG only MixUp/CutMix coefficients), which is what
a checkpoint needs to resume an epoch exactly. On a GPU the decoded images live on the device
(`PreparedData.on`) and whole batches are augmented there (`BatchAugment`).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import nn
from torch.nn import functional as F_nn

from workers.artifacts import Classifier, backbone_fingerprint
from workers.backbones import Preprocessing, freeze_for_cpu, get_backbone
from workers.calibration import ECE_BINS, expected_calibration_error, fit_temperature, nll
from workers.config import TrainConfig
from workers.metrics import classification_metrics
from workers.preprocessing import BatchAugment, batch_mixer, eval_crop, mix_batch, normalize, to_device


class Control(Protocol):
    """What a training loop needs from whoever runs it."""

    def checkpoint(self) -> None:
        """Called between steps; raises to stop (cancelled, lease lost, shutting down)."""

    def progress(self, update: dict) -> None: ...


@dataclass
class PreparedData:
    """Decoded images as uint8 squares at the preprocessing's resize size, and their labels."""

    classes: list[str]
    preprocessing: Preprocessing
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    # What these pixels and this train/val split are (workers.data: the images' sha256s, decoding
    # and split); None for data made another way. Features are reused across jobs only with one.
    source_key: str | None = None

    def on(self, device: torch.device, share_of_free: float = 0.25) -> PreparedData:
        """The images moved to a GPU when they take at most `share_of_free` of its free memory, so
        batches are gathered and augmented there; otherwise (and on CPUs) unchanged. Labels stay
        on the host: samplers draw from them with a CPU generator."""
        if device.type != "cuda" or self.train_x.device == device:
            return self
        free, _ = torch.cuda.mem_get_info(device)
        if self.train_x.nbytes + self.val_x.nbytes > share_of_free * free:
            return self
        return PreparedData(self.classes, self.preprocessing, self.train_x.to(device), self.train_y,
                            self.val_x.to(device), self.val_y, self.source_key)


@dataclass
class TrainResult:
    classifier: Classifier
    metrics: dict
    history: list[dict] = field(default_factory=list)
    recipe: dict | None = None  # the resolved recipe that trained this model (auto: the one it chose)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
          control: Control, device: torch.device | None = None) -> TrainResult:
    device = device or pick_device()
    data = data.on(device)
    if config.strategy == "auto":
        from workers.auto import train_auto  # auto builds on this module
        return train_auto(config, data, features, feature_dim, control, device)
    return train_recipe(config, data, features, feature_dim, control, device, checkpoints=True)


def train_recipe(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
                 control: Control, device: torch.device, cache: FeatureCache | None = None,
                 deadline: float | None = None, checkpoints: bool = False) -> TrainResult:
    """One explicit recipe. A linear probe may be handed a `cache` of the same backbone's features.
    With a `deadline` (time.perf_counter()), fine-tuning ends after the last epoch that fits."""
    torch.manual_seed(config.seed)
    classifier = Classifier(features, feature_dim, len(data.classes), head=config.head,
                            hidden_dim=config.hidden_dim, dropout=config.dropout)
    classifier.tta_flip = bool(config.tta_flip)
    classifier.to(device, memory_format=torch.channels_last)
    started = time.perf_counter()
    if config.strategy == "linear_probe":
        if cache is None:
            if config.bn_mode == "adabn":
                adapt_batchnorm(features, data.train_x, data.preprocessing, device, control)
            cache = FeatureCache(features, data, device, control)
        if config.augmentation == "light":
            cache.mirror("train")  # backbone passes: before the head's single-threaded loop
        if config.tta_flip:
            cache.mirror("val")
        with single_thread(device):
            history, val_logits, seen = fit_head(config, classifier, cache, data.train_y, data.val_y, control)
    else:
        history, seen = fine_tune(config, data, classifier, control, device, deadline, checkpoints)
        classifier.eval()
        val_logits = _logits(classifier, data.val_x, data.preprocessing, device, control, bool(config.tta_flip))
    seconds = time.perf_counter() - started
    with single_thread(device):
        metrics = calibrate_and_score(classifier, val_logits, data.val_y, data.classes)
    best = _best_report(history, config.monitor)
    metrics.update(best_epoch=best["epoch"], epochs_run=len(history),
                   stopped_early=len(history) < (config.epochs or 0),
                   stopped_by=("deadline" if history and history[-1].get("deadline") else
                               "patience" if len(history) < (config.epochs or 0) else None),
                   train_seconds=round(seconds, 3),
                   # None when no image went through the backbone (features reused from a past job)
                   train_images_per_s=round(seen / seconds, 1) if seconds and seen else None,
                   num_train_images=int(len(data.train_y)))
    if cache is not None:
        metrics["features_reused"] = cache.reused  # from an earlier job on the same images and weights
    return TrainResult(classifier.to("cpu").float(), metrics, history, config.model_dump())


def calibrate_and_score(classifier: Classifier, val_logits: torch.Tensor, val_y: torch.Tensor,
                        classes: list[str]) -> dict:
    """Fit the temperature on the val logits, set it on the classifier, and score calibrated probs."""
    val_logits, val_y = val_logits.float().cpu(), val_y.cpu()
    temperature = fit_temperature(val_logits, val_y)
    classifier.temperature = temperature
    before = torch.softmax(val_logits, dim=1)
    metrics = classification_metrics(val_y, torch.softmax(val_logits / temperature, dim=1), classes)
    metrics["calibration"] = {
        "method": "temperature scaling, fitted on val", "temperature": round(temperature, 6),
        "ece_before": round(expected_calibration_error(before, val_y), 6),
        "ece_after": metrics["ece"], "nll_before": round(nll(val_logits, val_y), 6),
        "nll_after": metrics["val_loss"], "bins": ECE_BINS,
    }
    return metrics


@contextmanager
def single_thread(device: torch.device):
    """Run tiny CPU ops (a head on cached features) on one thread. With more, every op waits on a
    thread barrier: on a busy 2-core machine a linear probe measured 14x slower on 2 threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inference_batch_size(device: torch.device) -> int:
    # Measured on a 2-core CPU: Lite0 runs ~65 img/s at batch 4-8 but ~38 img/s at 32 (cache misses).
    return 256 if device.type == "cuda" else 8


def _autocast(device: torch.device):
    # bf16 on GPUs; CPUs stay in fp32 so the same seed gives the same result.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_batches(labels: torch.Tensor, batch_size: int, sampler: str, generator: torch.Generator,
                  min_batch: int = 1) -> Iterator[torch.Tensor]:
    """One epoch of index batches: a shuffle, or (sampler "balanced") N draws with replacement,
    each class equally likely. Batches smaller than `min_batch` are dropped."""
    n = len(labels)
    if sampler == "balanced":
        counts = torch.bincount(labels).float()
        weights = 1.0 / counts[labels]
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    else:
        order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) >= min_batch:
            yield idx


def steps_per_epoch(n: int, batch_size: int, min_batch: int = 1) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= min_batch and rest > 0 else 0)


class FeatureCache:
    """Backbone features of the train and val images (eval crop), and of their mirrors on demand.

    Computed once per job: the linear probe trains on it, and auto's search reuses it for every
    head it tries. On a CPU the backbone runs traced and frozen, as the API serves it: 1.7x faster
    than eager at batch 8 on 2 cores, for a 0.85 s freeze that later jobs on the same weights skip,
    and the features a head is fitted to are the ones it will be served with. There the features
    are also kept for later jobs of this process on the same images, split and backbone weights
    (`REUSED_FEATURES`): a user trying recipes on one dataset pays for the backbone once.
    `images` counts the backbone passes this job ran.
    """

    def __init__(self, features: nn.Module, data: PreparedData, device: torch.device, control: Control):
        self.data, self.device, self.control = data, device, control
        self._features, self._runner = features, None
        self.images = 0
        # On a CPU: what the backbone's weights are (sha256 of its state, ~35 ms for Lite0), the
        # key to features and to a frozen copy that earlier jobs of this process made.
        self._weights = backbone_fingerprint(features.state_dict()) if device.type == "cpu" else None
        key = REUSED_FEATURES.key(data, self._weights)
        entry = REUSED_FEATURES.get(key) if key else None
        self.reused = entry is not None
        if entry is None:
            control.progress({"phase": "extracting features"})
            entry = {"train": self._compute(data.train_x), "val": self._compute(data.val_x)}
            if key:
                REUSED_FEATURES.put(key, entry)
        self._entry = entry
        self.train, self.val = entry["train"], entry["val"]

    @property
    def runner(self) -> nn.Module:
        """What computes the features: on a CPU the frozen copy (made on first use, or an earlier
        job's of the same weights and crop size), else the backbone."""
        if self._runner is None:
            frozen = None
            if self._weights is not None:
                size = self.data.preprocessing.input_size
                frozen = _FROZEN.get((self._weights, size))
                if frozen is None and (frozen := freeze_for_cpu(self._features, size)) is not None:
                    _FROZEN[(self._weights, size)] = frozen
                    while len(_FROZEN) > 2:  # the backbones this worker trains on lately
                        _FROZEN.pop(next(iter(_FROZEN)))
            self._runner = frozen or self._features
        return self._runner

    def _compute(self, x_u8: torch.Tensor, mirrored: bool = False) -> torch.Tensor:
        crops = eval_crop(x_u8, self.data.preprocessing)
        self.images += len(x_u8)
        return _features_of(self.runner, crops.flip(-1) if mirrored else crops, self.data.preprocessing,
                            self.device, self.control)

    def mirror(self, split: str) -> torch.Tensor:
        name = f"{split}_mirror"
        if name not in self._entry:  # the entry may be shared: later jobs get the mirror too
            self._entry[name] = self._compute(self.data.train_x if split == "train" else self.data.val_x,
                                              mirrored=True)
        return self._entry[name]


class ReusedFeatures:
    """Features computed on this process's CPU, by (images and split, backbone weights, crop size);
    least recently used dropped first past `max_bytes`. Keyed by content, so different weights (a
    fine-tuned or AdaBN-adapted backbone) or other images never match."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: PreparedData, weights: str | None) -> str | None:
        if data.source_key is None or weights is None:
            return None
        return f"{data.source_key}:{weights}:{data.preprocessing.input_size}"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            return self._entries.get(key)

    def put(self, key: str, entry: dict[str, torch.Tensor]) -> None:
        with self._lock:
            self._entries[key] = entry
            while len(self._entries) > 1 and self._bytes() > self.max_bytes:
                self._entries.popitem(last=False)

    def _bytes(self) -> int:
        return sum(t.nbytes for entry in self._entries.values() for t in list(entry.values()))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# 256 MiB: Lite0's features of 20,000 images and their mirrors (205 MB), or of many small datasets.
REUSED_FEATURES = ReusedFeatures(256 * 1024**2)
# (weights sha256, crop size) -> a frozen copy made by an earlier job (freezing Lite0: 0.85 s)
_FROZEN: dict[tuple[str, int], nn.Module] = {}


@torch.no_grad()  # not inference_mode: a linear probe trains its head on these tensors
def _features_of(features: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, device,
                 control: Control) -> torch.Tensor:
    """Features of already-cropped uint8 images, in inference batches."""
    features.eval()
    out = []
    for idx in _batches(len(x_u8), inference_batch_size(device), None):
        x = normalize(x_u8[idx].to(device), pre)
        with _autocast(device):
            out.append(features(x).float())
        control.checkpoint()
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def _logits(classifier: Classifier, x_u8, pre, device, control, tta_flip: bool = False) -> torch.Tensor:
    crops = eval_crop(x_u8, pre)
    logits = classifier.head_logits(_features_of(classifier.features, crops, pre, device, control)).float()
    if tta_flip:
        mirrored = _features_of(classifier.features, crops.flip(-1), pre, device, control)
        logits = (logits + classifier.head_logits(mirrored).float()) / 2
    return logits.cpu()


# --- BatchNorm policy -------------------------------------------------------------------------

def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(features: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, device: torch.device,
                    control: Control, batch_size: int = 32) -> None:
    """AdaBN (Li et al. 2016): replace every BN layer's running statistics by their average over the
    target images (eval crop), then leave the layers in eval mode, so training keeps them fixed."""
    control.progress({"phase": "adapting batchnorm statistics"})
    bns = _batchnorms(features)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    features.eval()
    for bn in bns:
        bn.train()
    try:
        crops = eval_crop(x_u8, pre)
        for idx in _batches(len(crops), batch_size, None):
            if len(idx) < 2 and len(crops) >= 2:
                continue  # a lone image has no batch variance worth averaging
            with _autocast(device):
                features(normalize(crops[idx].to(device), pre))
            control.checkpoint()
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        features.eval()


def set_train_modes(classifier: Classifier, stages: list[nn.Module], trainable: int, bn_mode: str) -> None:
    """Head in train mode; of the backbone, only the last `trainable` stages. Their BN layers use
    batch statistics only for bn_mode "train"; frozen stages never do (a frozen layer on batch
    statistics shifts the features the trained layers were fitted to)."""
    classifier.train()
    classifier.features.eval()
    for stage in stages[len(stages) - trainable:] if trainable else []:
        stage.train()
        if bn_mode != "train":
            for bn in _batchnorms(stage):
                bn.eval()


# --- losses, schedules, early stopping --------------------------------------------------------

def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """'balanced' weights, n / (classes * count): each class contributes equally to the loss."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return len(labels) / (num_classes * counts)


def make_criterion(config: TrainConfig, train_y: torch.Tensor, num_classes: int,
                   device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    weight = class_weights(train_y, num_classes).to(device) if config.class_weighting == "balanced" else None
    smoothing = config.label_smoothing or 0.0

    def criterion(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # target: class indices, or mixed soft targets [N, C]
        return F_nn.cross_entropy(logits.float(), target, weight=weight, label_smoothing=smoothing)
    return criterion


def l2sp_penalty(params: list[nn.Parameter], reference: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP (Li et al. 2018): 1/2 * sum |w - w_pretrained|^2 over the given backbone parameters."""
    if not params:
        return torch.zeros(())
    return 0.5 * sum(((p - r) ** 2).sum() for p, r in zip(params, reference))


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """Stepped once per batch. one_cycle peaks at each group's own rate after warmup_fraction."""
    total_steps = max(1, total_steps)
    if config.schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps,
            # at least two warm-up steps: OneCycleLR divides by zero when the phase is one step long
            pct_start=min(0.99, max(config.warmup_fraction, 2.0 / total_steps)))
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(total_steps, round(total_steps * config.warmup_fraction)))


def _score(report: dict, monitor: str) -> tuple[float, float]:
    """Larger is better; ties on accuracy go to the lower loss."""
    if monitor == "val_loss":
        return (-report["val_loss"], report["val_accuracy"])
    return (report["val_accuracy"], -report["val_loss"])


def _best_report(history: list[dict], monitor: str) -> dict:
    return max(history, key=lambda h: _score(h, monitor))


def training_state(epoch: int, classifier: Classifier, opt, sched, gen: torch.Generator,
                   stopper: "EarlyStopping", history: list[dict], seen: int) -> dict:
    """Everything an epoch's end needs to continue exactly: weights, optimizer, schedule, RNGs,
    early-stopping memory and history (tensors and plain values only: weights_only loadable)."""
    return {"epoch": epoch, "model": classifier.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "best": stopper.best, "best_state": stopper.best_state, "bad_epochs": stopper.bad_epochs,
            "history": history, "seen": seen}


def restore_training_state(state: dict, classifier: Classifier, opt, sched, gen: torch.Generator,
                           stopper: "EarlyStopping") -> tuple[list[dict], int, int]:
    """Load a `training_state`; returns (history, images seen, the epoch to run next)."""
    classifier.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    stopper.best, stopper.best_state, stopper.bad_epochs = state["best"], state["best_state"], state["bad_epochs"]
    return list(state["history"]), int(state["seen"]), int(state["epoch"]) + 1


class EarlyStopping:
    """Keeps the best epoch's weights by `monitor`; says stop after `patience` epochs without a gain."""

    def __init__(self, monitor: str, patience: int | None):
        self.monitor, self.patience = monitor, patience
        self.best: dict | None = None
        self.best_state: dict | None = None
        self.bad_epochs = 0

    def update(self, report: dict, module: nn.Module) -> bool:
        """Record an epoch; True when training should stop."""
        if self.best is None or _score(report, self.monitor) > _score(self.best, self.monitor):
            self.best, self.bad_epochs = report, 0
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.patience is not None and self.bad_epochs >= self.patience

    def restore(self, module: nn.Module) -> None:
        module.load_state_dict(self.best_state)


def _epoch_report(epoch: int, epochs: int, train_loss: float, val_logits: torch.Tensor,
                  val_y: torch.Tensor, lr: float) -> dict:
    val_logits, val_y = val_logits.float().cpu(), val_y.cpu()
    val_loss = float(F_nn.cross_entropy(val_logits, val_y))
    val_acc = float((val_logits.argmax(1) == val_y).float().mean())
    return {"epoch": epoch, "epochs": epochs, "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6), "val_accuracy": round(val_acc, 6), "lr": float(f"{lr:.6g}")}


def _param_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decoupled weight decay on weights only; never on BatchNorm parameters or biases."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return [g for g in groups if g["params"]] if lr is not None else groups


# --- linear probe: the head on cached features ------------------------------------------------

def fit_head(config: TrainConfig, classifier: Classifier, cache: FeatureCache, train_y: torch.Tensor,
             val_y: torch.Tensor, control: Control) -> tuple[list[dict], torch.Tensor, int]:
    """Train `classifier.head` on cached features; returns history, best-epoch val logits, images seen."""
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    device = cache.train.device
    train_f, train_y = cache.train, train_y.to(device)
    if config.augmentation == "light":  # the probe's augmentation: each image's mirror
        train_f, train_y = torch.cat([train_f, cache.mirror("train")]), torch.cat([train_y, train_y])
    val_f, val_f_mirror = cache.val, cache.mirror("val") if config.tta_flip else None

    def val_logits() -> torch.Tensor:
        with torch.no_grad():
            logits = classifier.head_logits(val_f).float()
            if val_f_mirror is not None:
                logits = (logits + classifier.head_logits(val_f_mirror).float()) / 2
        return logits.cpu()

    head = nn.ModuleDict({"dropout": classifier.input_dropout, "head": classifier.head})
    opt = torch.optim.AdamW(_param_groups(head, config.weight_decay, config.learning_rate))
    total_steps = config.epochs * steps_per_epoch(len(train_y), config.batch_size)
    sched = make_scheduler(opt, config, total_steps)
    criterion = make_criterion(config, train_y, _num_classes(classifier), device)
    mixer = batch_mixer(config.mixup_alpha, 0.0, _num_classes(classifier))
    gen = torch.Generator().manual_seed(config.seed)
    stopper = EarlyStopping(config.monitor, config.patience)
    history = []
    classifier.features.eval()
    for epoch in range(1, config.epochs + 1):
        head.train()  # only the head's modules: walking the backbone every epoch costs more than the epoch
        loss_sum, count = torch.zeros((), device=device), 0  # summed on the device, as in fine_tune
        for idx in train_batches(train_y.cpu(), config.batch_size, config.sampler, gen):
            idx = to_device(idx, device)
            x, target = mix_batch(train_f[idx], train_y[idx], mixer, config.mix_prob, gen)
            logits, rep = classifier.head_with_representation(x)
            loss = criterion(logits, target)
            if config.feature_l1:
                loss = loss + config.feature_l1 * rep.abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            count += len(idx)
        head.eval()
        report = _epoch_report(epoch, config.epochs, loss_sum.item() / max(count, 1), val_logits(), val_y,
                               opt.param_groups[0]["lr"])
        history.append(report)
        stop = stopper.update(report, head)
        control.progress({"phase": "training", **report})
        control.checkpoint()
        if stop:
            break
    stopper.restore(head)
    classifier.eval()
    # Images/s counts the backbone passes, which dominate the cost.
    return history, val_logits(), cache.images


def _num_classes(classifier: Classifier) -> int:
    last = classifier.head if isinstance(classifier.head, nn.Linear) else classifier.head[-1]
    return last.out_features


# --- fine-tuning strategies ---------------------------------------------------------------------

def unfreeze_plan(config: TrainConfig, num_stages: int) -> Callable[[int], int]:
    """epoch (1-based) -> how many backbone stages, counted from the output, train in that epoch.

    fine_tune: all; partial: `unfreeze_stages`; gradual (ULMFiT / fastai): the head alone in
    epoch 1, then one more stage each epoch, up to `unfreeze_stages` (default all).
    """
    limit = min(config.unfreeze_stages or num_stages, num_stages)
    if config.strategy == "fine_tune":
        return lambda epoch: num_stages
    if config.strategy == "partial":
        return lambda epoch: limit
    if config.strategy == "gradual":
        return lambda epoch: min(epoch - 1, limit)
    raise ValueError(f"{config.strategy!r} does not train backbone stages")


def stage_param_groups(classifier: Classifier, stages: list[nn.Module], trained: int, config: TrainConfig,
                       ) -> tuple[list[dict], list[nn.Parameter]]:
    """Optimizer groups: the head at learning_rate; the k-th stage from the output at
    learning_rate * lr_stage_factor**k (decay on weights only; with l2sp, none on the backbone).
    Also returns the backbone parameters that can train (for L2-SP)."""
    lr, factor = config.learning_rate, config.lr_stage_factor or 1.0
    head = nn.ModuleDict({"head": classifier.head})
    groups = _param_groups(head, config.weight_decay, lr)
    backbone_params: list[nn.Parameter] = []
    backbone_decay = 0.0 if config.l2sp else config.weight_decay
    for k, stage in enumerate(reversed(stages[len(stages) - trained:]), start=1):
        for p in stage.parameters():
            p.requires_grad_(True)
        groups += _param_groups(stage, backbone_decay, lr * factor ** k)
        backbone_params += [p for p in stage.parameters()]
    return groups, backbone_params


def fine_tune(config: TrainConfig, data: PreparedData, classifier: Classifier, control: Control,
              device: torch.device, deadline: float | None = None,
              checkpoints: bool = False) -> tuple[list[dict], int]:
    """With `checkpoints`, each epoch's end is saved through the control (when it can), and a
    retried job resumes after the last saved epoch with the same result as an uninterrupted run."""
    resume = control.resume_state() if checkpoints and hasattr(control, "resume_state") else None
    save = control.save_checkpoint if checkpoints and hasattr(control, "save_checkpoint") else None
    pre = data.preprocessing
    stages = get_backbone(config.backbone).stages(classifier.features)
    plan = unfreeze_plan(config, len(stages))
    most = max(plan(e) for e in range(1, config.epochs + 1))
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    if config.bn_mode == "adabn" and resume is None:  # a resumed run restores the adapted statistics
        adapt_batchnorm(classifier.features, data.train_x, pre, device, control)
    groups, backbone_params = stage_param_groups(classifier, stages, most, config)
    reference = [p.detach().clone() for p in backbone_params] if config.l2sp else []
    opt = torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type == "cuda")
    min_batch = 2 if config.bn_mode == "train" else 1  # batch statistics of one image are undefined
    per_epoch = steps_per_epoch(len(data.train_y), config.batch_size, min_batch)
    sched = make_scheduler(opt, config, per_epoch * config.epochs)
    criterion = make_criterion(config, data.train_y, len(data.classes), device)
    augment = BatchAugment(config.augmentation, pre)
    mixer = batch_mixer(config.mixup_alpha, config.cutmix_alpha, len(data.classes))
    gen = torch.Generator().manual_seed(config.seed)
    stopper = EarlyStopping(config.monitor, config.patience)
    history, seen, first_epoch = [], 0, 1
    if resume is not None:
        history, seen, first_epoch = restore_training_state(resume, classifier, opt, sched, gen, stopper)
    for epoch in range(first_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        trainable = plan(epoch)
        for i, stage in enumerate(stages):
            for p in stage.parameters():
                p.requires_grad_(i >= len(stages) - trainable)
        set_train_modes(classifier, stages, trainable, config.bn_mode)
        # The epoch's loss sums on the device: a .item() per step would make the CPU wait for
        # the GPU to drain, then leave the GPU idle while it queues the next step.
        loss_sum, count = torch.zeros((), device=device), 0
        batches = train_batches(data.train_y, config.batch_size, config.sampler, gen, min_batch)
        for step, idx in enumerate(batches, start=1):
            x = augment(data.train_x[to_device(idx, data.train_x.device)].to(device, non_blocking=True), gen)
            x, target = mix_batch(x, to_device(data.train_y[idx], device), mixer, config.mix_prob, gen)
            with _autocast(device):
                logits, rep = classifier.head_with_representation(classifier.features(x))
            loss = criterion(logits, target)
            if config.feature_l1:
                loss = loss + config.feature_l1 * rep.float().abs().mean()
            if config.l2sp:
                loss = loss + config.l2sp * l2sp_penalty(backbone_params, reference)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(idx)
            count, seen = count + len(idx), seen + len(idx)
            control.progress({"phase": "training", "epoch": epoch, "epochs": config.epochs,
                              "step": step, "steps": per_epoch, "trainable_stages": trainable})
            control.checkpoint()
        classifier.eval()
        val_logits = _logits(classifier, data.val_x, pre, device, control, bool(config.tta_flip))
        report = _epoch_report(epoch, config.epochs, loss_sum.item() / max(count, 1), val_logits, data.val_y,
                               opt.param_groups[0]["lr"])
        report["trainable_stages"] = trainable
        history.append(report)
        stop = stopper.update(report, classifier)
        control.progress({"phase": "training", **report})
        if stop:
            break
        if save is not None and epoch < config.epochs:
            save(epoch, training_state(epoch, classifier, opt, sched, gen, stopper, history, seen))
        if deadline is not None and epoch < config.epochs and 2 * time.perf_counter() - epoch_started > deadline:
            report["deadline"] = True  # the next epoch would not end before the deadline
            break
    stopper.restore(classifier)
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    return history, seen
