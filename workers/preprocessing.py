"""Pixels in, tensors out: the one preprocessing path for training, evaluation and prediction.

Each image is decoded once, its shorter side resized to `resize_size` and center-cropped to a
`resize_size` square of uint8 (the cached form). Evaluation and prediction center-crop that square
to `input_size`, which equals the usual "resize 256 -> center crop 224"; training augments it.
"""
from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from workers.backbones import Preprocessing
from workers.imaging import decode_image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def square_u8(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Shorter side to pre.resize_size, center square crop: uint8 [3, S, S]."""
    s = pre.resize_size
    w, h = img.size
    scale = s / min(w, h)
    size = (max(s, round(w * scale)), max(s, round(h * scale)))
    img = img.resize(size, _RESAMPLE[pre.interpolation], reducing_gap=None)
    left, top = (size[0] - s) // 2, (size[1] - s) // 2
    img = img.crop((left, top, left + s, top + s))
    return F.pil_to_tensor(img)


def decode_square(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """Bytes to the cached uint8 square; raises imaging.ImageRejected for unusable bytes."""
    return square_u8(decode_image(data, draft_size=pre.resize_size), pre)


def eval_crop(batch_u8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return F.center_crop(batch_u8, [pre.input_size, pre.input_size])


def normalize(batch_u8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [N,3,H,W] to the network's float input, channels_last (faster on CPUs and GPUs alike)."""
    x = batch_u8.float().div_(255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def train_augmentation(preset: str, pre: Preprocessing) -> v2.Transform:
    """Per-sample train-time augmentation of a uint8 square; `none` is the eval crop."""
    size = [pre.input_size, pre.input_size]
    if preset == "none":
        return v2.CenterCrop(size)
    ops: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=(0.25, 1.0), antialias=True),
                               v2.RandomHorizontalFlip()]
    if preset == "strong":
        ops += [v2.TrivialAugmentWide(), v2.RandomErasing(p=0.25, value=0)]
    return v2.Compose(ops)


def augment_batch(batch_u8: torch.Tensor, transform: v2.Transform) -> torch.Tensor:
    # v2 transforms draw one set of parameters per call, so a batch needs one call per sample.
    return torch.stack([transform(img) for img in batch_u8])


def batch_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix (one of the two per batch, at random, when both are on); None when off."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def mix_batch(x: torch.Tensor, y: torch.Tensor, mixer: v2.Transform | None, mix_prob: float | None,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability mix_prob, mix the batch: returns soft targets [N, C] then, else the labels.

    Works on image batches [N,3,H,W] and on feature batches [N,D] (MixUp only: viewed as [N,D,1,1]).
    Whether to mix is drawn from `generator`; the mixing coefficient from torch's global RNG
    (seeded per job), as torchvision draws it.
    """
    if mixer is None or len(y) < 2 or float(torch.rand((), generator=generator)) >= (mix_prob or 0.0):
        return x, y
    if x.ndim == 2:
        mixed, targets = mixer(x[:, :, None, None], y)
        return mixed.flatten(1), targets
    return mixer(x, y)
