"""fine_tune_top: the last k stages and the head, trained on cached activations.

The frozen bottom of a network whose top is fine-tuned (its BatchNorm in eval mode, as in partial)
computes the same thing for an image in every epoch. So it runs once: `StageActivations` holds the input of the last k stages for
each image's eval crop and for its mirror (fp16, on the host), and the top trains on that, each
epoch showing each image once, as itself or its mirror at random. Lite0, k=2, bloodcells (752
train images at 224 px, 2-core CPU shared with other jobs, one thread): caching train and val with
mirrors 142 s (56 MB), 12 epochs 67 s (4.4-7.2 s each), val accuracy 0.940 (0.942 with tta_flip)
where the default linear probe scored 0.876. The same cache gives the probe's features (`pooled`),
so a search pays for one bottom pass.

The top runs the backbone's own modules from the cut on (a layout per architecture family: timm's
EfficientNets, torchvision's ResNets), so what `fit_top` returns is the ordinary Classifier — the
full network, its bottom bit-identical to pretrained — stored and served like a fine_tune model.
A ViT's cache holds tokens [N, T, D] (its class token and position embedding are in the bottom).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torchvision.models as tvm
from timm.models.efficientnet import EfficientNet
from torch import nn

from workers.artifacts import Classifier
from workers.backbones import (_REGNET_STAGES, _RESNET_STAGES, _VIT_STAGES, BACKBONES, BackboneSpec,
                                Preprocessing, freeze_for_cpu, get_backbone)
from workers.config import TrainConfig
from workers.decoded_cache import SCRATCH
from workers.device import autocast, inference_batch_size
from workers.preprocessing import batch_mixer, eval_crop, mix_batch, normalize, to_device
from workers.progress import PhaseMeter
from workers.training.contract import Control, PreparedData
from workers.training.finetune import stage_param_groups
from workers.training.parts import (EarlyStopping, batchnorms, epoch_report, images_per_epoch, make_criterion,
                                    make_scheduler, optimizer_step, regularized_loss, set_train_modes,
                                    steps_per_epoch, train_batches)

# The stage groups (workers/backbones.py) of the families whose forward is their stages in order,
# then pooling: timm's EfficientNets (Lite0, and any Lite with the same module names) and ResNets.
_EFFICIENTNET_STAGES = ("conv_stem bn1", "blocks.*", "conv_head bn2")
TOP_BATCH = 64  # the top's inference batches (pooled, logits, AdaBN)
TRACE_FROM_IMAGES = 64  # tracing Lite0's bottom costs about what 30-60 eager images do


# timm model classes (timm/<model> and registered backbones) whose forward_features runs their
# top-level modules in order (a container of stages, one child after the other; a ViT's embedding
# first, _TIMM_EMBEDDINGS), and whose forward_head(pre_logits=True) runs the rest: the class -> the
# top-level modules forward_head runs.
# tests/unit/test_top_tuning.py checks each against the model's own forward at every cut.
_TIMM_SEQUENTIAL: dict[str, tuple[str, ...]] = {
    "EfficientNet": ("global_pool", "classifier"),
    "ResNet": ("global_pool", "fc"),
    "ConvNeXt": ("head",),
    "RegNet": ("head",),
    "ByobNet": ("head",),
    "MobileNetV3": ("global_pool", "conv_head", "norm_head", "act2", "flatten", "classifier"),
    "VisionTransformer": ("attn_pool", "fc_norm", "head_drop", "head"),  # pool: class token, mean or attention
}
# timm classes whose forward_features begins with a step no top-level module runs by itself (a ViT:
# patch embedding, then class and register tokens and position embedding in _pos_embed): the
# top-level units (modules, parameters) it uses, and the step.
_TIMM_EMBEDDINGS: dict[str, tuple[tuple[str, ...], Callable[[nn.Module, torch.Tensor], torch.Tensor]]] = {
    "VisionTransformer": (("cls_token", "reg_token", "pos_embed", "patch_embed", "pos_drop", "patch_drop",
                           "norm_pre"),
                          lambda f, x: f.norm_pre(f.patch_drop(f._pos_embed(f.patch_embed(x))))),
}


def supports_top_tuning(spec: BackboneSpec) -> bool:
    """True when the backbone's forward splits cleanly between any two stages."""
    if spec.timm is not None:
        return spec.timm.family in _TIMM_SEQUENTIAL
    if spec.package is not None:  # the Lites
        return spec.stage_groups == _EFFICIENTNET_STAGES
    return ((spec.head == "fc" and spec.stage_groups in (_RESNET_STAGES, _REGNET_STAGES))
            or (spec.head == "heads.head" and spec.stage_groups == _VIT_STAGES))


class _Embedding(nn.Module):
    """A ViT's way from pixels to tokens, which its network runs in code of its own: a module that
    holds the very parameters and modules that code uses, so it is a stage part like any other."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], parts: dict[str, nn.Module | nn.Parameter]):
        super().__init__()
        self._run = run
        for name, part in parts.items():
            if isinstance(part, nn.Parameter):
                self.register_parameter(name, part)
            else:
                self.add_module(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _timm_embedding(f: nn.Module, family: str) -> tuple[set[str], _Embedding | None]:
    """The units of `f` that its family's embedding step stands for, and the step (none: no such step)."""
    if family not in _TIMM_EMBEDDINGS:
        return set(), None
    names, run = _TIMM_EMBEDDINGS[family]
    parts = {n: f._parameters[n] if n in f._parameters else f.get_submodule(n) for n in names
             if f._parameters.get(n) is not None or n in f._modules}
    return set(parts), _Embedding(lambda x: run(f, x), parts)


# --- the forward, cut between stages --------------------------------------------------------------

def _stage_modules(features: nn.Module, spec: BackboneSpec) -> tuple[list[list[nn.Module]], Callable]:
    """The modules each stage runs, in order, and the tail that pools the last stage's output into
    features; checked against `spec.stages` so a stage here is a stage there."""
    f = features
    if spec.timm is not None and supports_top_tuning(spec):
        run_by_head = _TIMM_SEQUENTIAL[spec.timm.family]
        embedded, embedding = _timm_embedding(f, spec.timm.family)
        stages = []
        for group in spec.stage_groups:
            stage = [embedding if p in embedded else f.get_submodule(p) for p in group.split()
                     if p.split(".")[0] not in run_by_head]
            stages.append([m for i, m in enumerate(stage) if not any(m is o for o in stage[:i])])  # the step once
        # forward_features' parameter-free last modules (an Identity norm) are in no stage: run them too
        children = [n for n, _ in f.named_children()]
        after = children[children.index(spec.stage_groups[-1].split()[-1].split(".")[0]) + 1:]
        stages[-1] += [f.get_submodule(n) for n in after if n not in run_by_head]

        def tail(x):  # global pool (and what else the family's head runs before its classifier)
            return f.forward_head(x, pre_logits=True)
        return stages, tail  # built from spec.stage_groups itself: nothing to check against
    if isinstance(f, EfficientNet) and supports_top_tuning(spec):
        stages = [[f.conv_stem, f.bn1], *([b] for b in f.blocks), [f.conv_head, f.bn2]]

        def tail(x):  # global pool, flatten, dropout when the model has any; the classifier is gone
            return f.forward_head(x, pre_logits=True)
    elif isinstance(f, tvm.ResNet) and supports_top_tuning(spec):
        stages = [[f.conv1, f.bn1, f.relu, f.maxpool], [f.layer1], [f.layer2], [f.layer3], [f.layer4]]

        def tail(x):
            return torch.flatten(f.avgpool(x), 1)
    elif isinstance(f, tvm.RegNet) and supports_top_tuning(spec):
        stages = [[f.stem], *([b] for b in f.trunk_output)]

        def tail(x):
            return torch.flatten(f.avgpool(x), 1)
    elif isinstance(f, tvm.VisionTransformer) and supports_top_tuning(spec):
        encoder = f.encoder

        def embed(x):  # VisionTransformer.forward up to its encoder's layers
            x = f._process_input(x)
            x = torch.cat([f.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return encoder.dropout(x + encoder.pos_embedding)
        parts = {"class_token": f.class_token, "conv_proj": f.conv_proj, "pos_embedding": encoder.pos_embedding,
                 "dropout": encoder.dropout}
        stages = [[_Embedding(embed, parts)], *([layer] for layer in encoder.layers), [encoder.ln]]

        def tail(x):  # the class token's output, through the heads build_features left (an Identity)
            return f.heads(x[:, 0])
    else:
        raise ValueError(f"backbone {spec.name!r} cannot be cut between stages; fine_tune_top supports "
                         f"{', '.join(n for n, s in BACKBONES.items() if supports_top_tuning(s))}")
    theirs = spec.stages(features)
    if len(theirs) != len(stages) or any({id(p) for m in mine for p in m.parameters()} != {id(p) for p in t.parameters()}
                                         for mine, t in zip(stages, theirs)):
        raise ValueError(f"backbone {spec.name!r}: its stages do not match the {type(f).__name__} layout")
    return stages, tail


def _cut(features: nn.Module, spec: BackboneSpec, k: int) -> tuple[int, list[list[nn.Module]], Callable]:
    stages, tail = _stage_modules(features, spec)
    k = min(max(int(k), 1), len(stages))  # more than the backbone has means all, as for partial
    return k, stages, tail


def bottom_of(features: nn.Module, spec: BackboneSpec, k: int) -> nn.Module:
    """Images -> the input of the last k stages (modules shared with `features`)."""
    k, stages, _ = _cut(features, spec, k)
    return nn.Sequential(*(m for stage in stages[:len(stages) - k] for m in stage))


class _Top(nn.Module):
    def __init__(self, body: nn.Sequential, tail: Callable):
        super().__init__()
        self.body, self._tail = body, tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._tail(self.body(x))


def top_of(features: nn.Module, spec: BackboneSpec, k: int) -> nn.Module:
    """The input of the last k stages -> pooled features (modules shared with `features`)."""
    k, stages, tail = _cut(features, spec, k)
    return _Top(nn.Sequential(*(m for stage in stages[len(stages) - k:] for m in stage)), tail)


# --- the cache ------------------------------------------------------------------------------------

@dataclass
class StageActivations:
    """Inputs of the last k stages of a frozen backbone for each image's eval crop and its mirror
    (fp16, on the host; feature maps channels_last)."""

    acts: torch.Tensor  # [N, C, H, W] float16; a ViT's tokens [N, T, D]
    acts_mirror: torch.Tensor  # the same for each image's mirror
    spec: BackboneSpec
    k: int  # stages above the cut (clamped to the backbone's)
    seconds: float = 0.0  # the bottom passes took this long
    control: Control | None = field(default=None, repr=False, compare=False)  # reports `pooled`'s pass

    @classmethod
    @torch.no_grad()
    def compute(cls, features: nn.Module, spec: BackboneSpec, x_u8: torch.Tensor, pre: Preprocessing, k: int,
                device: torch.device, control: Control, meter: PhaseMeter | None = None) -> StageActivations:
        """Bottom forward in eval mode over uint8 squares [N, 3, S, S] (eval crop; and its mirror).
        Phase "caching activations", in images (each with its mirror); `meter` counts them
        instead, for one phase over several calls."""
        started = time.perf_counter()
        features.eval()
        k = _cut(features, spec, k)[0]
        bottom = _runner(bottom_of(features, spec, k), pre, device, len(x_u8))
        n, acts, mirror = len(x_u8), None, None
        meter = meter or PhaseMeter(control, "caching activations", n, "images")
        for idx in _batches(n, inference_batch_size(device)):
            crops = eval_crop(x_u8[to_device(idx, x_u8.device)], pre).to(device)
            with autocast(device):
                a, m = bottom(normalize(crops, pre)), bottom(normalize(crops.flip(-1), pre))
            if acts is None:
                # beyond the worker's memory budget: in a scratch file, read back a batch at a time
                acts, mirror = (SCRATCH.empty((n, *a.shape[1:]), torch.float16, channels_last=a.dim() == 4)
                                for _ in range(2))
            acts[idx], mirror[idx] = a.to("cpu", torch.float16), m.to("cpu", torch.float16)
            control.stop_if_asked()
            meter.advance(len(idx))
        if acts is None:
            raise ValueError("no images to cache activations of")
        return cls(acts, mirror, spec, k, time.perf_counter() - started, control)

    def cat(self, other: StageActivations) -> StageActivations:
        """These images, then the other's (same backbone and cut)."""
        if (other.spec.name, other.k) != (self.spec.name, self.k):
            raise ValueError("activations of different backbones or cuts cannot be joined")
        return StageActivations(torch.cat([self.acts, other.acts]), torch.cat([self.acts_mirror, other.acts_mirror]),
                                self.spec, self.k, self.seconds + other.seconds, self.control)

    def batch(self, rows: torch.Tensor, device: torch.device, mirrored: torch.Tensor | bool = False) -> torch.Tensor:
        """float32 activations of `rows` on `device`: the mirrors' when `mirrored` is True, or where
        it is, per row."""
        if isinstance(mirrored, bool):
            x = (self.acts_mirror if mirrored else self.acts)[rows]
        else:
            x = torch.where(mirrored.view(-1, *[1] * (self.acts.dim() - 1)), self.acts_mirror[rows], self.acts[rows])
        x = x.to(device).float()
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()

    @torch.no_grad()
    def pooled(self, features: nn.Module, control: Control | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen top run over the cache: pooled features [N, D] (float32, host) of the images and
        of their mirrors — the probe's features, from the same bottom pass. Phase "pooling
        features" (images and mirrors), through `control` or the one the cache was computed under."""
        features.eval()
        top = top_of(features, self.spec, self.k)
        device = next(features.parameters()).device
        control = control or self.control
        meter = PhaseMeter(control, "pooling features", 2 * len(self.acts), "images") if control else None
        out = []
        for mirrored in (False, True):
            parts = []
            for rows in _batches(len(self.acts), TOP_BATCH):
                parts.append(top(self.batch(rows, device, mirrored)).float().cpu())
                if meter is not None:
                    control.stop_if_asked()
                    meter.advance(len(rows))
            out.append(torch.cat(parts))
        return out[0], out[1]

    def __len__(self) -> int:
        return len(self.acts)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield torch.arange(start, min(start + size, n))


def _runner(bottom: nn.Module, pre: Preprocessing, device: torch.device, images: int) -> nn.Module:
    """On a CPU the bottom traced and frozen (BatchNorm folded, one GIL-free call), when that works
    and there are images enough to repay the trace."""
    if device.type != "cpu" or len(bottom) == 0 or images < TRACE_FROM_IMAGES:
        return bottom
    return freeze_for_cpu(bottom, pre.input_size) or bottom


# --- training -------------------------------------------------------------------------------------

def fit_top(config: TrainConfig, features: nn.Module, spec: BackboneSpec, acts: StageActivations,
            idx: torch.Tensor, y: torch.Tensor, num_classes: int, control: Control,
            device: torch.device) -> Classifier:
    """Train the last config.unfreeze_stages stages (at most acts.k) and a head on acts[idx] (labels
    y, aligned with idx) for all config.epochs. Returns a Classifier on a deep copy of `features`
    whose other parameters and buffers are bit-identical; `features` is never modified."""
    return train_top(config, features, spec, acts, idx, y, num_classes, control, device)[0]


def train_top(config: TrainConfig, features: nn.Module, spec: BackboneSpec, acts: StageActivations,
              idx: torch.Tensor, y: torch.Tensor, num_classes: int, control: Control, device: torch.device,
              val_idx: torch.Tensor | None = None, val_y: torch.Tensor | None = None,
              deadline: float | None = None, init_head: Callable[[Classifier], object] | None = None,
              ) -> tuple[Classifier, list[dict], int]:
    """`fit_top`, with early stopping on (val_idx, val_y) when given (the best epoch by
    config.monitor is kept) and a `deadline` (time.perf_counter()) after which no epoch starts.
    Returns the classifier, the epoch history and the images trained on. Deterministic for
    config.seed; torch's global RNG is left as it was."""
    trained = min(config.unfreeze_stages or acts.k, acts.k)
    if config.unfreeze_stages and config.unfreeze_stages > acts.k and acts.k < len(spec.stages(features)):
        raise ValueError(f"activations cut {acts.k} stages from the output cannot train {config.unfreeze_stages}")
    idx, y = idx.cpu(), y.cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the head's initialisation, dropout and MixUp coefficients
        classifier = top_classifier(config, features, spec, num_classes)
        if init_head is not None:  # training on from a base model: its head rows (workers/base_model.py)
            init_head(classifier)
        classifier.tta_flip = bool(config.tta_flip)
        classifier.to(device, memory_format=torch.channels_last)
        history, seen = _train_loop(config, classifier, spec, acts, trained, idx, y, num_classes, control, device,
                                    val_idx, val_y, deadline)
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier.eval(), history, seen


def top_classifier(config: TrainConfig, features: nn.Module, spec: BackboneSpec, num_classes: int) -> Classifier:
    """The network fine_tune_top trains: a deep copy of `features` under the recipe's head."""
    return Classifier(copy.deepcopy(features), spec.feature_dim, num_classes, head=config.head or "linear",
                      hidden_dim=config.hidden_dim, dropout=config.dropout or 0.0)


def _train_loop(config, classifier, spec, acts, trained, idx, y, num_classes, control, device, val_idx, val_y,
                deadline) -> tuple[list[dict], int]:
    stages = spec.stages(classifier.features)
    for p in classifier.features.parameters():
        p.requires_grad_(False)
    groups, backbone_params = stage_param_groups(classifier, stages, trained, config)
    reference = [p.detach().clone() for p in backbone_params] if config.l2sp else []
    opt = torch.optim.AdamW(groups, lr=config.learning_rate, fused=device.type == "cuda")
    min_batch = 2 if config.bn_mode == "train" else 1  # batch statistics of one image are undefined
    per_epoch = steps_per_epoch(len(idx), config.batch_size, min_batch)
    sched = make_scheduler(opt, config, per_epoch * config.epochs)
    criterion = make_criterion(config, y, num_classes, device)
    mixer = batch_mixer(config.mixup_alpha, 0.0, num_classes)  # MixUp of activations (manifold mixup)
    gen = torch.Generator().manual_seed(config.seed)
    top = top_of(classifier.features, spec, acts.k)
    if config.bn_mode == "adabn":
        _adapt_batchnorm(top, stages[len(stages) - trained:], acts, idx, device, control)
    mirror = config.augmentation not in (None, "none")  # "light": each image or its mirror
    tuned = nn.ModuleDict({"head": classifier.head, "stages": nn.ModuleList(stages[len(stages) - trained:])})
    stopper = EarlyStopping(config.monitor, config.patience)
    history, seen = [], 0
    meter = PhaseMeter(control, "training", config.epochs * images_per_epoch(len(idx), config.batch_size, min_batch),
                       "images")
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        set_train_modes(classifier, stages, trained, config.bn_mode)
        loss_sum, count = torch.zeros((), device=device), 0
        for step, b in enumerate(train_batches(y, config.batch_size, config.sampler, gen, min_batch), start=1):
            flips = torch.rand(len(b), generator=gen) < 0.5 if mirror else False
            x = acts.batch(idx[b], device, flips)
            x, target = mix_batch(x, to_device(y[b], device), mixer, config.mix_prob, gen)
            with autocast(device):
                logits, rep = classifier.head_with_representation(top(x))
            loss = regularized_loss(config, criterion, logits, target, rep, backbone_params, reference)
            optimizer_step(loss, opt, sched)
            loss_sum += loss.detach() * len(b)
            count += len(b)
            meter.report(len(b), epoch=epoch, epochs=config.epochs, step=step, steps=per_epoch)
            control.stop_if_asked()
        seen += count
        classifier.eval()
        report = _epoch_report(epoch, config, loss_sum.item() / max(count, 1), opt, classifier, spec, acts,
                               val_idx, val_y)
        history.append(report)
        stop = val_idx is not None and stopper.update(report, tuned)
        meter.report(**report)
        if stop:
            break
        if deadline is not None and epoch < config.epochs and 2 * time.perf_counter() - epoch_started > deadline:
            report["deadline"] = True  # the next epoch would not end before the deadline
            break
    if val_idx is not None:
        stopper.restore(tuned)
    return history, seen


def _epoch_report(epoch, config, train_loss, opt, classifier, spec, acts, val_idx, val_y) -> dict:
    lr = opt.param_groups[0]["lr"]
    if val_idx is None:
        return {"epoch": epoch, "epochs": config.epochs, "train_loss": round(train_loss, 6), "lr": float(f"{lr:.6g}")}
    val_logits = top_logits(classifier, spec, acts.k, acts, val_idx, bool(config.tta_flip))
    return epoch_report(epoch, config.epochs, train_loss, val_logits, val_y, lr)


@torch.no_grad()
def _adapt_batchnorm(top: nn.Module, tuned: list[nn.Module], acts: StageActivations, idx: torch.Tensor,
                     device: torch.device, control: Control) -> None:
    """AdaBN on the trained stages only: their running statistics become the average over the cached
    training images (the bottom, whose output is cached, keeps the pretrained ones); then frozen."""
    meter = PhaseMeter(control, "adapting batchnorm statistics", len(idx), "images")
    bns = [bn for stage in tuned for bn in batchnorms(stage)]
    if not bns:  # LayerNorm only (a ViT): no statistics to adapt
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
        bn.train()
    try:
        for b in _batches(len(idx), TOP_BATCH):
            if len(b) >= 2 or len(idx) < 2:  # a lone image has no batch variance worth averaging
                with autocast(device):
                    top(acts.batch(idx[b], device))
                control.stop_if_asked()
            meter.advance(len(b))
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
            bn.eval()


@torch.no_grad()
def top_logits(classifier: Classifier, spec: BackboneSpec, k: int, acts: StageActivations, idx: torch.Tensor,
               tta_flip: bool = True) -> torch.Tensor:
    """Logits (float32, host) of cached images acts[idx], mirror-averaged when tta_flip: what the
    full classifier gives for those images, without running the bottom again."""
    return top_outputs(classifier, spec, k, acts, idx, tta_flip)[0]


@torch.no_grad()
def top_outputs(classifier: Classifier, spec: BackboneSpec, k: int, acts: StageActivations, idx: torch.Tensor,
                tta_flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """top_logits' logits, and the features the head read (float32, host; mirror-averaged when
    tta_flip, as workers/ood.served_features serves them): the out-of-distribution score's input."""
    if k != acts.k:
        raise ValueError(f"these activations were cut {acts.k} stages from the output, not {k}")
    classifier.eval()
    top = top_of(classifier.features, spec, acts.k)
    device = next(classifier.parameters()).device
    out, feats = [], []
    for b in _batches(len(idx), TOP_BATCH):
        rows = idx.cpu()[b]
        with autocast(device):
            f = top(acts.batch(rows, device)).float()
            logits = classifier.head_logits(f).float()
            if tta_flip:
                fm = top(acts.batch(rows, device, True)).float()
                logits = (logits + classifier.head_logits(fm).float()) / 2
                f = (f + fm) / 2
        out.append(logits.cpu())
        feats.append(f.cpu())
    return (torch.cat(out), torch.cat(feats)) if out else (torch.empty(0), torch.empty(0))


# --- the explicit strategy --------------------------------------------------------------------------

def fine_tune_top(config: TrainConfig, data: PreparedData, features: nn.Module, control: Control,
                  device: torch.device, deadline: float | None = None,
                  init_head: Callable[[Classifier], object] | None = None,
                  ) -> tuple[Classifier, list[dict], torch.Tensor, int]:
    """strategy fine_tune_top: cache train and val, train on train, early-stop on val. Returns the
    classifier, history, the best epoch's val logits and the images trained on."""
    spec = get_backbone(config.backbone)
    k = config.unfreeze_stages
    pre = data.preprocessing
    meter = PhaseMeter(control, "caching activations", len(data.train_x) + len(data.val_x), "images")
    acts = StageActivations.compute(features, spec, data.train_x, pre, k, device, control, meter).cat(
        StageActivations.compute(features, spec, data.val_x, pre, k, device, control, meter))
    n = len(data.train_y)
    train_idx, val_idx = torch.arange(n), torch.arange(n, len(acts))
    classifier, history, seen = train_top(config, features, spec, acts, train_idx, data.train_y,
                                          len(data.classes), control, device, val_idx, data.val_y, deadline,
                                          init_head)
    val_logits = top_logits(classifier, spec, acts.k, acts, val_idx, bool(config.tta_flip))
    return classifier, history, val_logits, seen
