"""fine_tune / partial / gradual: the head and some backbone stages train on augmented images."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from workers.artifacts import Classifier
from workers.backbones import get_backbone
from workers.config import TrainConfig
from workers.device import autocast
from workers.preprocessing import BatchAugment, batch_mixer, mix_batch, to_device
from workers.progress import PhaseMeter
from workers.training.contract import Control, PreparedData
from workers.training.parts import (EarlyStopping, adapt_batchnorm, epoch_report, images_per_epoch, logits_of,
                                    make_criterion, make_scheduler, optimizer_step, param_groups, regularized_loss,
                                    restore_training_state, set_train_modes, steps_per_epoch, train_batches,
                                    training_state)


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
    groups = param_groups(head, config.weight_decay, lr)
    backbone_params: list[nn.Parameter] = []
    backbone_decay = 0.0 if config.l2sp else config.weight_decay
    for k, stage in enumerate(reversed(stages[len(stages) - trained:]), start=1):
        for p in stage.parameters():
            p.requires_grad_(True)
        groups += param_groups(stage, backbone_decay, lr * factor ** k)
        backbone_params += [p for p in stage.parameters()]
    return groups, backbone_params


def fine_tune(config: TrainConfig, data: PreparedData, classifier: Classifier, control: Control,
              device: torch.device, deadline: float | None = None,
              checkpoints: bool = False) -> tuple[list[dict], int]:
    """With `checkpoints`, each epoch's end is saved through the control (when it can), and a
    retried job resumes after the last saved epoch with the same result as an uninterrupted run."""
    resume = control.resume_state() if checkpoints else None
    save = control.save_checkpoint if checkpoints else None
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
    # Counted in training images (each step's batch); a resumed run starts at what it had seen.
    meter = PhaseMeter(control, "training", config.epochs * images_per_epoch(len(data.train_y), config.batch_size,
                                                                              min_batch), "images", done=seen)
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
            with autocast(device):
                logits, rep = classifier.head_with_representation(classifier.features(x))
            loss = regularized_loss(config, criterion, logits, target, rep, backbone_params, reference)
            optimizer_step(loss, opt, sched)
            loss_sum += loss.detach() * len(idx)
            count, seen = count + len(idx), seen + len(idx)
            meter.report(len(idx), epoch=epoch, epochs=config.epochs, step=step, steps=per_epoch,
                         trainable_stages=trainable)
            control.stop_if_asked()
        classifier.eval()
        val_logits = logits_of(classifier, data.val_x, pre, device, control, bool(config.tta_flip))
        report = epoch_report(epoch, config.epochs, loss_sum.item() / max(count, 1), val_logits, data.val_y,
                               opt.param_groups[0]["lr"])
        report["trainable_stages"] = trainable
        history.append(report)
        stop = stopper.update(report, classifier)
        meter.report(**report)
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
