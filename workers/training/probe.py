"""linear_probe: the backbone frozen, its features computed once, a head fitted on them."""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

from workers.artifacts import Classifier, backbone_fingerprint, mirror_averaged
from workers.backbones import freeze_for_cpu
from workers.config import TrainConfig
from workers.preprocessing import batch_mixer, eval_crop, mix_batch, to_device
from workers.progress import PhaseMeter
from workers.training.contract import Control, PreparedData
import workers.training.logistic as logistic
from workers.training.parts import (EarlyStopping, epoch_report, features_of, make_criterion, make_scheduler,
                                    optimizer_step, param_groups, regularized_loss, steps_per_epoch, train_batches)


class FeatureCache:
    """Backbone features of the train and val images (eval crop), and of their mirrors on demand.

    Computed once per job: the linear probe trains on it, and auto's search reuses it for every
    head it tries. On a CPU the backbone runs traced and frozen, as the API serves it: 1.7x faster
    than eager at batch 8 on 2 cores, for a 0.85 s freeze that later jobs on the same weights skip,
    and the features a head is fitted to are the ones it will be served with. There the features
    are also kept for later jobs of this process on the same images, split and backbone weights
    (`REUSED_FEATURES`): a user trying recipes on one dataset pays for the backbone once.
    `images` counts the backbone passes this job ran.

    The passes are one phase, "extracting features", counted in images through the backbone:
    train and val, and the mirrors of the splits in `mirrors` ("train", "val"), computed now.
    A mirror asked for later adds its images to the phase.
    """

    def __init__(self, features: nn.Module, data: PreparedData, device: torch.device, control: Control,
                 mirrors: tuple[str, ...] = ()):
        self.data, self.device, self.control = data, device, control
        self._features, self._runner = features, None
        self.images = 0
        self._meter: PhaseMeter | None = None
        # On a CPU: what the backbone's weights are (sha256 of its state, ~35 ms for Lite0), the
        # key to features and to a frozen copy that earlier jobs of this process made.
        self._weights = backbone_fingerprint(features.state_dict()) if device.type == "cpu" else None
        key = REUSED_FEATURES.key(data, self._weights)
        entry = REUSED_FEATURES.get(key) if key else None
        self.reused = entry is not None
        self._entry = entry or {}
        pending = [split for split in mirrors if f"{split}_mirror" not in self._entry]
        if entry is None or pending:
            todo = (len(data.train_x) + len(data.val_x) if entry is None else 0) + sum(map(self._count, pending))
            self._meter = PhaseMeter(control, "extracting features", todo, "images")
        if entry is None:
            entry = self._entry = {"train": self._compute(data.train_x), "val": self._compute(data.val_x)}
            if key:
                REUSED_FEATURES.put(key, entry)
        self.train, self.val = entry["train"], entry["val"]
        for split in pending:
            self.mirror(split, counted=True)

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

    def _count(self, split: str) -> int:
        return len(self.data.train_x if split == "train" else self.data.val_x)

    def _compute(self, x_u8: torch.Tensor, mirrored: bool = False) -> torch.Tensor:
        crops = eval_crop(x_u8, self.data.preprocessing)
        self.images += len(x_u8)
        return features_of(self.runner, crops, self.data.preprocessing, self.device, self.control,
                           on_batch=self._meter, mirrored=mirrored)

    def mirror(self, split: str, counted: bool = False) -> torch.Tensor:
        """The features of the split's mirrored images (computed on first use)."""
        name = f"{split}_mirror"
        if name not in self._entry:  # the entry may be shared: later jobs get the mirror too
            if self._meter is None:
                self._meter = PhaseMeter(self.control, "extracting features", self._count(split), "images")
            elif not counted:
                self._meter.grow(self._count(split))
            self._entry[name] = self._compute(self.data.train_x if split == "train" else self.data.val_x,
                                              mirrored=True)
        return self._entry[name]


def pooled_features(cache: FeatureCache, tta_flip: bool) -> torch.Tensor:
    """The frozen features of train then val on the host, mirror-averaged when the model averages
    mirrors: what a head on them reads at /predict (issue 17's out-of-distribution score)."""
    from workers.ood import served_features
    mirrored = torch.cat([cache.mirror("train"), cache.mirror("val")]).cpu() if tta_flip else None
    return served_features(torch.cat([cache.train, cache.val]).cpu(), mirrored)


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


# --- linear probe: the head on cached features ------------------------------------------------

def fit_head(config: TrainConfig, classifier: Classifier, cache: FeatureCache, train_y: torch.Tensor,
             val_y: torch.Tensor, control: Control) -> tuple[list[dict], torch.Tensor, int]:
    """Train `classifier.head` on cached features; returns history, best-epoch val logits, images seen."""
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    if config.solver == "lbfgs":
        return fit_logistic_head(config, classifier, cache, train_y, val_y, control)
    device = cache.train.device
    train_f, train_y = cache.train, train_y.to(device)
    if config.augmentation == "light":  # the probe's augmentation: each image's mirror
        train_f, train_y = torch.cat([train_f, cache.mirror("train")]), torch.cat([train_y, train_y])
    val_f, val_f_mirror = cache.val, cache.mirror("val") if config.tta_flip else None

    def val_logits() -> torch.Tensor:
        with torch.no_grad():
            mirrored = classifier.head_logits(val_f_mirror).float() if val_f_mirror is not None else None
            return mirror_averaged(classifier.head_logits(val_f).float(), mirrored).cpu()

    head = nn.ModuleDict({"dropout": classifier.input_dropout, "head": classifier.head})
    opt = torch.optim.AdamW(param_groups(head, config.weight_decay, config.learning_rate))
    total_steps = config.epochs * steps_per_epoch(len(train_y), config.batch_size)
    sched = make_scheduler(opt, config, total_steps)
    criterion = make_criterion(config, train_y, num_classes_of(classifier), device)
    mixer = batch_mixer(config.mixup_alpha, 0.0, num_classes_of(classifier))
    gen = torch.Generator().manual_seed(config.seed)
    stopper = EarlyStopping(config.monitor, config.patience)
    history = []
    classifier.features.eval()
    meter = PhaseMeter(control, "training", config.epochs, "epochs")
    for epoch in range(1, config.epochs + 1):
        head.train()  # only the head's modules: walking the backbone every epoch costs more than the epoch
        loss_sum, count = torch.zeros((), device=device), 0  # summed on the device, as in fine_tune
        for idx in train_batches(train_y.cpu(), config.batch_size, config.sampler, gen):
            idx = to_device(idx, device)
            x, target = mix_batch(train_f[idx], train_y[idx], mixer, config.mix_prob, gen)
            logits, rep = classifier.head_with_representation(x)
            loss = regularized_loss(config, criterion, logits, target, rep)
            optimizer_step(loss, opt, sched)
            loss_sum += loss.detach() * len(idx)
            count += len(idx)
        head.eval()
        report = epoch_report(epoch, config.epochs, loss_sum.item() / max(count, 1), val_logits(), val_y,
                               opt.param_groups[0]["lr"])
        history.append(report)
        stop = stopper.update(report, head)
        meter.report(1, **report)
        control.stop_if_asked()
        if stop:
            break
    stopper.restore(head)
    classifier.eval()
    # Images/s counts the backbone passes, which dominate the cost.
    return history, val_logits(), cache.images


def fit_logistic_head(config: TrainConfig, classifier: Classifier, cache: FeatureCache, train_y: torch.Tensor,
                      val_y: torch.Tensor, control: Control) -> tuple[list[dict], torch.Tensor, int]:
    """solver "lbfgs": logistic regression (workers/training/logistic.py) fitted once, folded into the
    linear head; its history is that one fit, scored on val."""
    if train_y.ndim == 2:  # multi-label (issue 17): one binary logistic regression per label
        from workers.training.multilabel import fit_ovr_head
        return fit_ovr_head(config, classifier, cache, train_y, val_y, control)
    mirror = cache.mirror("train").cpu() if config.augmentation == "light" else None
    meter = PhaseMeter(control, "training", 1, "fits", solver="lbfgs")
    x, y = logistic.training_set(cache.train.cpu(), train_y.cpu(), mirror)
    fit = logistic.fit_logistic(x, y, num_classes_of(classifier), config.logistic_c,
                                balanced=config.class_weighting == "balanced")
    fit.load_into(classifier.head)
    classifier.eval()
    train_loss = float(torch.nn.functional.cross_entropy(logistic.head_logits(fit, x, None), y))
    with torch.no_grad():  # the served arithmetic: the float32 head, mirror-averaged when tta_flip
        val_logits = classifier.head_logits(cache.val).float()
        if config.tta_flip:
            val_logits = (val_logits + classifier.head_logits(cache.mirror("val")).float()) / 2
    val_logits = val_logits.cpu()
    report = epoch_report(1, 1, train_loss, val_logits, val_y, 0.0)
    meter.report(1, **report)
    control.stop_if_asked()
    return [report], val_logits, cache.images


def num_classes_of(classifier: Classifier) -> int:
    last = classifier.head if isinstance(classifier.head, nn.Linear) else classifier.head[-1]
    return last.out_features


