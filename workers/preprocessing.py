"""Pixels in, tensors out: the one preprocessing path for training, evaluation and prediction.

Each image is decoded once, its shorter side resized to `resize_size` and center-cropped to a
`resize_size` square of uint8 (the cached form). Evaluation and prediction center-crop that square
to `input_size`, which equals the usual "resize 256 -> center crop 224"; training augments it.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F_nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from workers.backbones import Preprocessing
from workers.imaging import decode_pixels


def square_u8(pixels: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [3, h, w] pixels: shorter side to pre.resize_size, center square crop: uint8 [3, S, S].

    Resized by torch's uint8 kernel, antialiased as Pillow resizes (within 2 levels of Pillow's
    bicubic on hymenoptera): a 500x375 photo took 0.3 ms where Pillow took 2.2 ms on one core.
    Pixels that are a view of HWC memory (as decoded) are the channels_last kernel's input.
    """
    s = pre.resize_size
    h, w = pixels.shape[-2:]
    scale = s / min(w, h)
    size = (max(s, round(h * scale)), max(s, round(w * scale)))  # (height, width)
    x = pixels[None]
    if size != (h, w):
        x = F_nn.interpolate(x, size=size, mode=pre.interpolation, antialias=True, align_corners=False)
    top, left = (size[0] - s) // 2, (size[1] - s) // 2
    return x[0, :, top:top + s, left:left + s]


def decode_square(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """Bytes to the cached uint8 square; raises imaging.ImageRejected for unusable bytes."""
    return square_u8(decode_pixels(data, draft_size=pre.resize_size), pre)


def eval_crop(batch_u8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    return F.center_crop(batch_u8, [pre.input_size, pre.input_size])


def normalize(batch_u8: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 [N,3,H,W] to the network's float input, channels_last (faster on CPUs and GPUs alike)."""
    return _standardize(batch_u8.float().div_(255.0), pre)


def _standardize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Float pixels in [0, 1] to the network's input: (x - mean) / std, channels_last, in place."""
    mean = to_device(torch.tensor(pre.mean).view(1, 3, 1, 1), x.device)
    std = to_device(torch.tensor(pre.std).view(1, 3, 1, 1), x.device)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device. A blocking copy to a GPU
    synchronizes the stream: in a training step the CPU would stop queueing kernels until the
    GPU drained. From pageable memory the driver stages the bytes before returning, so the
    source may go at once."""
    return t.to(device, non_blocking=True)


class BatchAugment:
    """Train-time augmentation of a whole uint8 batch in a few tensor ops, on whatever device the
    batch is on: no per-sample Python in the training step (issue 7).

    none: the eval crop. light: a random resized crop (area 25-100% of the square, aspect 3/4-4/3)
    and a horizontal flip per image, sampled bilinearly in one `grid_sample` call. strong: light,
    then per-image brightness, contrast and saturation in [0.6, 1.4] and, with probability 1/4, a
    random black rectangle (random erasing). Every random number comes from the CPU `generator`,
    so a checkpoint of the generator resumes the same draws on CPU and GPU alike.
    """

    SCALE, RATIO, JITTER, ERASE_P = (0.25, 1.0), (3 / 4, 4 / 3), 0.4, 0.25

    def __init__(self, preset: str, pre: Preprocessing):
        if preset not in ("none", "light", "strong"):
            raise ValueError(f"augmentation must be none, light or strong, not {preset!r}")
        self.preset, self.pre = preset, pre

    def __call__(self, batch_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 [N,3,S,S] -> normalized float [N,3,input,input], channels_last."""
        if self.preset == "none":
            return normalize(eval_crop(batch_u8, self.pre), self.pre)
        x = self._resized_crops(batch_u8.float().div_(255.0), generator)
        if self.preset == "strong":
            x = self._erase(self._colour(x, generator), generator)
        return _standardize(x, self.pre)

    def _resized_crops(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, out = len(x), self.pre.input_size
        area = torch.empty(n).uniform_(*self.SCALE, generator=gen)
        log_ratio = torch.empty(n).uniform_(math.log(self.RATIO[0]), math.log(self.RATIO[1]), generator=gen)
        ratio = log_ratio.exp()
        # crop width and height as fractions of the square's side (at most all of it)
        w = (area * ratio).sqrt().clamp(max=1.0)
        h = (area / ratio).sqrt().clamp(max=1.0)
        # crop centre in [-1, 1] coordinates, keeping the crop inside the image
        cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F_nn.affine_grid(to_device(theta, x.device), [n, 3, out, out], align_corners=False)
        return F_nn.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _colour(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(x)
        lo, hi = 1 - self.JITTER, 1 + self.JITTER
        b, c, s = to_device(torch.empty(3, n).uniform_(lo, hi, generator=gen), x.device).view(3, n, 1, 1, 1)
        luma = to_device(_LUMA, x.device)
        x = (x * b).clamp_(0.0, 1.0)
        mean_grey = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        x = ((x - mean_grey) * c + mean_grey).clamp_(0.0, 1.0)
        grey = (x * luma).sum(1, keepdim=True)
        return ((x - grey) * s + grey).clamp_(0.0, 1.0)

    def _erase(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, side = len(x), x.shape[-1]
        erase = torch.rand(n, generator=gen) < self.ERASE_P
        area = torch.empty(n).uniform_(0.02, 0.33, generator=gen)
        ratio = torch.empty(n).uniform_(math.log(0.3), math.log(3.3), generator=gen).exp()
        eh = ((area * ratio).sqrt() * side).clamp(1, side)
        ew = ((area / ratio).sqrt() * side).clamp(1, side)
        top = torch.rand(n, generator=gen) * (side - eh)
        left = torch.rand(n, generator=gen) * (side - ew)
        # the rectangles as masks, built on the batch's device from 5 numbers per image
        top, eh, left, ew, erase = (to_device(t, x.device) for t in (top, eh, left, ew, erase))
        pos = torch.arange(side, dtype=torch.float32, device=x.device)
        rows = (pos >= top[:, None]) & (pos < (top + eh)[:, None]) & erase[:, None]  # [N, side]
        cols = (pos >= left[:, None]) & (pos < (left + ew)[:, None])
        return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)


_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as torchvision's grayscale


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

    Works on image batches [N,3,H,W] and on feature or token batches [N,D], [N,T,D] (MixUp only:
    viewed as [N,D,1,1], [N,T*D,1,1]). Whether to mix is drawn from `generator`; the mixing
    coefficient from torch's global RNG (seeded per job), as torchvision draws it.
    """
    if mixer is None or len(y) < 2 or float(torch.rand((), generator=generator)) >= (mix_prob or 0.0):
        return x, y
    if x.ndim < 4:  # torchvision's MixUp takes image batches; it mixes whole rows, whatever their shape
        mixed, targets = mixer(x.reshape(len(x), -1, 1, 1), y)
        return mixed.reshape(x.shape), targets
    return mixer(x, y)
