"""The pieces every strategy shares: batches, backbone passes, BatchNorm policy, losses,
schedules, early stopping, resumable state, and calibration of the finished classifier."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F_nn

from workers.artifacts import Classifier, calibrated_probabilities, mirror_averaged
from workers.backbones import Preprocessing
from workers.calibration import ECE_BINS, expected_calibration_error, fit_temperature, nll
from workers.config import TrainConfig
from workers.device import autocast, inference_batch_size
from workers.metrics import classification_metrics
from workers.preprocessing import eval_crop, normalize
from workers.progress import PhaseMeter
from workers.training.contract import Control


def index_batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
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


def images_per_epoch(n: int, batch_size: int, min_batch: int = 1) -> int:
    """Images an epoch of `train_batches` trains on: all n, but a tail batch under min_batch."""
    full, rest = divmod(n, batch_size)
    return full * batch_size + (rest if rest >= min_batch else 0)


@torch.no_grad()  # not inference_mode: a linear probe trains its head on these tensors
def features_of(features: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, device,
                 control: Control, on_batch: Callable[[int], None] | None = None,
                 mirrored: bool = False) -> torch.Tensor:
    """Features of already-cropped uint8 images (of their mirrors, with `mirrored`), in inference
    batches; `on_batch(n)` after each batch of n (a PhaseMeter counts them). Only a batch of the
    images is read at a time (they may be a memory map) and the features fill one tensor."""
    features.eval()
    out = None
    for idx in index_batches(len(x_u8), inference_batch_size(device), None):
        batch = x_u8[idx]
        x = normalize((batch.flip(-1) if mirrored else batch).to(device), pre)
        with autocast(device):
            f = features(x).float()
        if out is None:
            out = torch.empty((len(x_u8), *f.shape[1:]), dtype=f.dtype, device=f.device)
        out[idx.to(f.device)] = f
        control.stop_if_asked()
        if on_batch is not None:
            on_batch(len(idx))
    return out if out is not None else torch.empty(0)


@torch.no_grad()
def logits_of(classifier: Classifier, x_u8, pre, device, control, tta_flip: bool = False) -> torch.Tensor:
    crops = eval_crop(x_u8, pre)
    logits = classifier.head_logits(features_of(classifier.features, crops, pre, device, control)).float()
    mirrored = None
    if tta_flip:
        mirrored = classifier.head_logits(features_of(classifier.features, crops, pre, device, control,
                                                      mirrored=True)).float()
    return mirror_averaged(logits, mirrored).cpu()


# --- BatchNorm policy -------------------------------------------------------------------------

def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(features: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, device: torch.device,
                    control: Control, batch_size: int = 32) -> None:
    """AdaBN (Li et al. 2016): replace every BN layer's running statistics by their average over the
    target images (eval crop), then leave the layers in eval mode, so training keeps them fixed."""
    meter = PhaseMeter(control, "adapting batchnorm statistics", len(x_u8), "images")
    bns = batchnorms(features)
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    features.eval()
    for bn in bns:
        bn.train()
    try:
        crops = eval_crop(x_u8, pre)
        for idx in index_batches(len(crops), batch_size, None):
            if len(idx) >= 2 or len(crops) < 2:  # a lone image has no batch variance worth averaging
                with autocast(device):
                    features(normalize(crops[idx].to(device), pre))
                control.stop_if_asked()
            meter.advance(len(idx))
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
            for bn in batchnorms(stage):
                bn.eval()


# --- losses, schedules, early stopping --------------------------------------------------------

def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """'balanced' weights, n / (classes * count): each class contributes equally to the loss."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return len(labels) / (num_classes * counts)


def make_criterion(config: TrainConfig, train_y: torch.Tensor, num_classes: int,
                   device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if train_y.ndim == 2:  # multi-label (issue 17): a sigmoid per label, binary cross-entropy
        from workers.training.multilabel import bce_criterion
        return bce_criterion(config, train_y, device)
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


def regularized_loss(config: TrainConfig, criterion, logits: torch.Tensor, target: torch.Tensor, rep: torch.Tensor,
                     backbone_params: list[nn.Parameter] = (), reference: list[torch.Tensor] = ()) -> torch.Tensor:
    """The criterion, plus feature_l1 on the representation the final layer reads and, with l2sp
    and trained backbone weights, their pull toward the pretrained ones."""
    loss = criterion(logits, target)
    if config.feature_l1:
        loss = loss + config.feature_l1 * rep.float().abs().mean()
    if config.l2sp and backbone_params:
        loss = loss + config.l2sp * l2sp_penalty(backbone_params, reference)
    return loss


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> None:
    """One step of every loop: gradients of `loss`, the optimizer's update, the per-batch schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


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
    """Larger is better; ties on accuracy go to the lower loss (multi-label: mAP, not accuracy)."""
    if monitor == "val_loss":
        return (-report["val_loss"], report.get("val_map", report["val_accuracy"]))
    if "val_map" in report:
        return (report["val_map"], -report["val_loss"])
    return (report["val_accuracy"], -report["val_loss"])


def best_report(history: list[dict], monitor: str) -> dict:
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


def epoch_report(epoch: int, epochs: int, train_loss: float, val_logits: torch.Tensor,
                  val_y: torch.Tensor, lr: float) -> dict:
    val_logits, val_y = val_logits.float().cpu(), val_y.cpu()
    if val_y.ndim == 2:  # multi-label (issue 17): BCE, subset accuracy at 0.5 and macro mAP
        from workers.training.multilabel import multilabel_epoch_scores
        return {"epoch": epoch, "epochs": epochs, "train_loss": round(train_loss, 6),
                **multilabel_epoch_scores(val_logits, val_y), "lr": float(f"{lr:.6g}")}
    val_loss = float(F_nn.cross_entropy(val_logits, val_y))
    val_acc = float((val_logits.argmax(1) == val_y).float().mean())
    return {"epoch": epoch, "epochs": epochs, "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6), "val_accuracy": round(val_acc, 6), "lr": float(f"{lr:.6g}")}


def param_groups(module: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
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



def calibrate_and_score(classifier: Classifier, val_logits: torch.Tensor, val_y: torch.Tensor,
                        classes: list[str], target_precision: float | None = None) -> dict:
    """Fit the temperature on the val logits, set it on the classifier, and score calibrated probs.
    Multi-label (val_y [N, C]; issue 17): per-label calibration and thresholds instead
    (`target_precision`: the precision each label's threshold must reach, else the best F1)."""
    if val_y.ndim == 2:
        from workers.training.multilabel import calibrate_and_score_multilabel
        return calibrate_and_score_multilabel(classifier, val_logits, val_y, classes, target_precision, "val")
    val_logits, val_y = val_logits.float().cpu(), val_y.cpu()
    temperature = fit_temperature(val_logits, val_y)
    classifier.temperature = temperature
    before = torch.softmax(val_logits, dim=1)
    metrics = classification_metrics(val_y, calibrated_probabilities(val_logits, temperature), classes)
    metrics["calibration"] = {
        "method": "temperature scaling, fitted on val", "temperature": round(temperature, 6),
        "ece_before": round(expected_calibration_error(before, val_y), 6),
        "ece_after": metrics["ece"], "nll_before": round(nll(val_logits, val_y), 6),
        "nll_after": metrics["val_loss"], "bins": ECE_BINS,
    }
    return metrics


