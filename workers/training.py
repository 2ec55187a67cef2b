"""Training as plain functions over explicit objects: data in, best classifier and metrics out.

`linear_probe` computes backbone features once and fits the head on them; `fine_tune` trains the
whole network from a new head, BatchNorm running statistics frozen, with per-sample
augmentation, AdamW and warm-up + cosine. Both keep the epoch with the best val accuracy.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn
from torch.nn import functional as F_nn

from workers.artifacts import Classifier
from workers.backbones import Preprocessing
from workers.config import TrainConfig
from workers.metrics import classification_metrics
from workers.preprocessing import augment_batch, eval_crop, normalize, train_augmentation


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


@dataclass
class TrainResult:
    classifier: Classifier
    metrics: dict
    history: list[dict] = field(default_factory=list)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
          control: Control, device: torch.device | None = None) -> TrainResult:
    device = device or pick_device()
    torch.manual_seed(config.seed)
    classifier = Classifier(features, feature_dim, len(data.classes)).to(device, memory_format=torch.channels_last)
    run = _fit_linear_probe if config.strategy == "linear_probe" else _fine_tune
    started = time.perf_counter()
    history, images_seen = run(config, data, classifier, control, device)
    seconds = time.perf_counter() - started
    classifier.eval()
    probs = _predict_probs(classifier, data.val_x, data, device)
    metrics = classification_metrics(data.val_y, probs, data.classes)
    best = max(history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    metrics.update(best_epoch=best["epoch"], train_seconds=round(seconds, 3),
                   train_images_per_s=round(images_seen / seconds, 1) if seconds else None,
                   num_train_images=int(len(data.train_y)))
    return TrainResult(classifier.to("cpu").float(), metrics, history)


def inference_batch_size(device: torch.device) -> int:
    # Measured on a 2-core CPU: Lite0 runs ~65 img/s at batch 4-8 but ~38 img/s at 32 (cache misses).
    return 256 if device.type == "cuda" else 8


def _autocast(device: torch.device):
    # bf16 on GPUs; CPUs stay in fp32 so the same seed gives the same result.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


@torch.no_grad()  # not inference_mode: a linear probe trains its head on these tensors
def _features_of(features: nn.Module, x_u8: torch.Tensor, pre: Preprocessing, device,
                 control: Control) -> torch.Tensor:
    features.eval()
    out = []
    for idx in _batches(len(x_u8), inference_batch_size(device), None):
        x = normalize(eval_crop(x_u8[idx], pre).to(device), pre)
        with _autocast(device):
            out.append(features(x).float())
        control.checkpoint()
    return torch.cat(out) if out else torch.empty(0)


def _predict_probs(classifier: Classifier, x_u8, data: PreparedData, device) -> torch.Tensor:
    return torch.softmax(_logits(classifier, x_u8, data.preprocessing, device, _NoControl()), dim=1)


class _NoControl:
    def checkpoint(self) -> None:
        pass

    def progress(self, update: dict) -> None:
        pass


def _epoch_report(epoch: int, epochs: int, train_loss: float, val_logits: torch.Tensor,
                  val_y: torch.Tensor) -> dict:
    val_loss = float(F_nn.cross_entropy(val_logits, val_y))
    val_acc = float((val_logits.argmax(1) == val_y).float().mean())
    return {"epoch": epoch, "epochs": epochs, "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6), "val_accuracy": round(val_acc, 6)}


def _keep_if_best(report: dict, best: dict | None, module: nn.Module, best_state: dict | None):
    key = (report["val_accuracy"], -report["val_loss"])
    if best is None or key > (best["val_accuracy"], -best["val_loss"]):
        return report, copy.deepcopy({k: v.detach().clone() for k, v in module.state_dict().items()})
    return best, best_state


def _fit_linear_probe(config: TrainConfig, data: PreparedData, classifier: Classifier, control: Control,
                      device) -> tuple[list[dict], int]:
    """Backbone frozen in eval mode; features computed once; the head trained on them."""
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    control.progress({"phase": "extracting features"})
    train_f = _features_of(classifier.features, data.train_x, data.preprocessing, device, control)
    val_f = _features_of(classifier.features, data.val_x, data.preprocessing, device, control)
    train_y, val_y = data.train_y.to(device), data.val_y.to(device)
    head = classifier.head
    opt = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history, best, best_state = [], None, None
    for epoch in range(1, config.epochs + 1):
        head.train()
        total, count = 0.0, 0
        for idx in _batches(len(train_f), config.batch_size, gen):
            loss = F_nn.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
        head.eval()
        with torch.no_grad():
            report = _epoch_report(epoch, config.epochs, total / max(count, 1), head(val_f).float().cpu(), val_y.cpu())
        history.append(report)
        best, best_state = _keep_if_best(report, best, head, best_state)
        control.progress({"phase": "training", **report})
        control.checkpoint()
    head.load_state_dict(best_state)
    # Images/s counts the backbone passes, which dominate the cost.
    return history, len(data.train_y) + len(data.val_y)


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Decoupled weight decay on weights only; never on BatchNorm parameters or biases."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _freeze_batchnorm_stats(module: nn.Module) -> None:
    # Small data, small batches: batch statistics are noisy, so BN layers stay in eval mode
    # (running statistics fixed) while their affine parameters still train.
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _fine_tune(config: TrainConfig, data: PreparedData, classifier: Classifier, control: Control,
               device) -> tuple[list[dict], int]:
    pre = data.preprocessing
    augmentation = train_augmentation(config.augmentation, pre)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(_param_groups(classifier, config.weight_decay), lr=config.learning_rate, fused=fused)
    steps_per_epoch = math.ceil(len(data.train_y) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, max(1, total_steps // 10)))
    gen = torch.Generator().manual_seed(config.seed)
    history, best, best_state, seen = [], None, None, 0
    for epoch in range(1, config.epochs + 1):
        classifier.train()
        _freeze_batchnorm_stats(classifier)
        total, count = 0.0, 0
        for step, idx in enumerate(_batches(len(data.train_y), config.batch_size, gen), start=1):
            x = normalize(augment_batch(data.train_x[idx], augmentation).to(device, non_blocking=True), pre)
            y = data.train_y[idx].to(device, non_blocking=True)
            with _autocast(device):
                loss = F_nn.cross_entropy(classifier(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count, seen = total + loss.item() * len(idx), count + len(idx), seen + len(idx)
            control.progress({"phase": "training", "epoch": epoch, "epochs": config.epochs,
                              "step": step, "steps": steps_per_epoch})
            control.checkpoint()
        classifier.eval()
        val_logits = _logits(classifier, data.val_x, pre, device, control)
        report = _epoch_report(epoch, config.epochs, total / max(count, 1), val_logits, data.val_y)
        history.append(report)
        best, best_state = _keep_if_best(report, best, classifier, best_state)
        control.progress({"phase": "training", **report})
    classifier.load_state_dict(best_state)
    return history, seen


@torch.no_grad()
def _logits(classifier: Classifier, x_u8, pre, device, control) -> torch.Tensor:
    feats = _features_of(classifier.features, x_u8, pre, device, control)
    return classifier.head(feats).float().cpu()
