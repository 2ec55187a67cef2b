"""Where a model looks: Grad-CAM and Grad-CAM++ heatmaps on the last convolutional stage.

Grad-CAM (Selvaraju et al. 2017) weighs each channel of the last convolutional stage's output A
by the mean gradient of the label's logit over it and keeps the positive part of the weighted
sum: a coarse map (7x7 for Lite0 at 224 px) of the evidence for that label. Grad-CAM++ (Chattopadhay
et al. 2018) weighs the positive gradients per position (alpha = g^2 / (2 g^2 + sum(A) g^3)),
which spreads the heat over several objects of the class instead of the strongest one.

"Last convolutional stage" is found, not listed (`cam_target`): one forward records every stage's
output shape (`BackboneSpec.stages`), and the last one that is a 4-D map is explained (Lite's
conv_head + bn2, a ResNet's layer4, ConvNeXt's last stage before its norm, MobileNetV3's last conv
before its Linear). A ViT has none after its patch embedding: there the patch tokens entering its
last encoder layer are laid out on their grid, as Grad-CAM for transformers does. The hooks live on a private copy of the backbone, one per backbone
module and process (`backbone_copy`): the loaded module may be serving /predict, or shared by every
linear probe on the same weights, and a hook on it would fire inside their forwards. The copy's
parameters need no gradient: each hooked output is detached there and made a leaf that requires
one (the forward goes on from a copy of it, which later in-place ops may change), so autograd records only what runs after the last stage (pooling and the head) and nothing
accumulates in the model's parameters (torch.autograd.grad, not backward).

The overlay covers what the model sees: the same decode, resize and centre crop as /predict
(`decode_pixels` with the predict draft size, `square_u8`, `eval_crop`), drawn at a side of at
least OVERLAY_MIN_SIDE pixels. Models trained with tta_flip average the map of the image with the
mirrored map of its mirror image, as their probabilities average both.
"""
from __future__ import annotations

import base64
import copy
import io
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from service.errors import InvalidInput
from workers.artifacts import LoadedModel
from workers.backbones import Preprocessing, get_backbone
from workers.imaging import ImageRejected, decode_pixels
from workers.preprocessing import eval_crop, normalize, square_u8

METHODS = ("gradcam", "gradcampp")
OVERLAY_MIN_SIDE = 224  # a 64 px model's view is drawn at this side, not as a stamp
OVERLAY_ALPHA = 0.45  # weight of the heat colours over the photo
COPIES_KEPT = 2  # backbone copies this process keeps for explaining (one per backbone module)


@dataclass
class Explanation:
    label: int  # the class explained
    probabilities: torch.Tensor  # [classes] calibrated, as /predict answers
    cam: torch.Tensor  # [h, w] the map at the stage's resolution, >= 0
    view: torch.Tensor  # uint8 [3, S, S]: the crop the model saw, at display size


def stage_outputs(features: nn.Module, backbone: str) -> list[nn.Module]:
    """The module whose output is each stage's output, input to output (a stage of several
    modules, e.g. Lite's "conv_head bn2", ends with its last)."""
    out = []
    for stage in get_backbone(backbone).stages(features):
        while isinstance(stage, nn.ModuleList) and len(stage):
            stage = stage[-1]
        out.append(stage)
    return out


class _Copies:
    """Private eval-mode copies of backbone modules, by the original's identity, with a lock each."""

    def __init__(self, kept: int):
        self.kept = kept
        self._copies: OrderedDict[int, tuple[weakref.ref, nn.Module, threading.Lock]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, features: nn.Module) -> tuple[nn.Module, threading.Lock]:
        key = id(features)
        with self._lock:
            entry = self._copies.get(key)
            if entry is not None and entry[0]() is features:
                self._copies.move_to_end(key)
                return entry[1], entry[2]
        mine = copy.deepcopy(features).float().eval().requires_grad_(False)  # outside the lock: ~10 ms
        with self._lock:
            self._copies[key] = (weakref.ref(features), mine, threading.Lock())
            self._copies.move_to_end(key)
            while len(self._copies) > self.kept:
                self._copies.popitem(last=False)
            return self._copies[key][1], self._copies[key][2]


_COPIES = _Copies(COPIES_KEPT)


def backbone_copy(features: nn.Module) -> tuple[nn.Module, threading.Lock]:
    return _COPIES.get(features)


def cam_target(features: nn.Module, backbone: str, input_size: int) -> tuple[int, int]:
    """(index into stage_outputs, prefix tokens) of the stage to explain, found once per backbone and
    size by one forward that records each stage's output shape. A convolutional network: its last stage
    with a 4-D output (prefix 0). A transformer, whose stages after the patch embedding output token
    sequences [N, prefix + h*w, D]: the input of its last encoder layer (the output of the one before),
    as Grad-CAM for ViTs does: the class token the head reads has seen every patch only through that
    last layer's attention, and a later output's patch tokens get no gradient."""
    key = (backbone, input_size)
    if key not in _TARGETS:
        shapes: list[tuple[int, ...]] = []
        modules = stage_outputs(features, backbone)
        hooks = [m.register_forward_hook(lambda _m, _i, o: shapes.append(
            tuple(o.shape) if isinstance(o, torch.Tensor) else ())) for m in modules]
        try:
            with torch.no_grad():
                features(torch.zeros(1, 3, input_size, input_size).contiguous(memory_format=torch.channels_last))
        finally:
            for h in hooks:
                h.remove()
        maps = [i for i, shape in enumerate(shapes) if len(shape) == 4]
        tokens = [i for i, shape in enumerate(shapes) if len(shape) == 3 and _prefix(shape[1]) is not None]
        if tokens and (not maps or tokens[-1] > maps[-1]) and len(tokens) >= 3:
            last_norm = isinstance(modules[tokens[-1]], nn.LayerNorm)
            index = tokens[-3] if last_norm else tokens[-2]
            _TARGETS[key] = (index, _prefix(shapes[index][1]))
        elif maps:
            _TARGETS[key] = (maps[-1], 0)
        else:
            raise ValueError(f"backbone {backbone} has no convolutional stage to explain")
    return _TARGETS[key]


_TARGETS: dict[tuple[str, int], tuple[int, int]] = {}


def _prefix(tokens: int) -> int | None:
    """Tokens before the patch grid in a sequence of `tokens` (a class token, registers), when the rest is square."""
    for prefix in range(0, 5):
        side = math.isqrt(tokens - prefix) if tokens > prefix else 0
        if side > 1 and side * side == tokens - prefix:
            return prefix
    return None


def _as_map(t: torch.Tensor, prefix: int) -> torch.Tensor:
    """A stage output as [N, C, h, w]: a 4-D map as it is, a token sequence's patch tokens on their grid."""
    if t.ndim == 4:
        return t
    grid = t[:, prefix:, :]
    side = math.isqrt(grid.shape[1])
    return grid.reshape(len(t), side, side, -1).permute(0, 3, 1, 2)


def class_activation_maps(model: LoadedModel, x: torch.Tensor, labels: list[int | None],
                          method: str = "gradcam") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Maps [N, h, w] (>= 0) for normalized images x [N, 3, H, W], the calibrated probabilities
    [N, classes] the model serves for them and the label each map explains (None: the top one)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    classifier, backbone = model.classifier, model.manifest["backbone"]
    features, lock = backbone_copy(classifier.features)
    with lock:
        index, prefix = cam_target(features, backbone, x.shape[-1])
        taken: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            leaf = output.detach().requires_grad_(True)
            taken.append(leaf)
            return leaf.clone()  # not the leaf itself: the next module may work in place (ResNet's ReLU)

        hook = stage_outputs(features, backbone)[index].register_forward_hook(keep)
        try:
            with torch.enable_grad():
                runs = []
                for view in ([x, x.flip(-1)] if classifier.tta_flip else [x]):
                    taken.clear()
                    logits = classifier.head_logits(features(view.contiguous(memory_format=torch.channels_last))).float()
                    runs.append((taken[-1], logits))  # the stage's output, and what followed from it
                probs = classifier.serve(runs[0][1].detach(), runs[1][1].detach() if len(runs) > 1 else None)[1]
                chosen = [int(probs[i].argmax()) if label is None else label for i, label in enumerate(labels)]
                rows = torch.arange(len(x))
                maps = []
                for k, (acts, logits) in enumerate(runs):
                    grads, = torch.autograd.grad(logits[rows, torch.tensor(chosen)].sum(), acts)
                    cam = _weighted(_as_map(acts.detach(), prefix), _as_map(grads, prefix), method)
                    maps.append(cam.flip(-1) if k == 1 else cam)  # the mirror's map, mirrored back
        finally:
            hook.remove()
    return sum(maps) / len(maps), probs, chosen


def _weighted(acts: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """Grad-CAM: channel weights = mean gradient; Grad-CAM++: positive gradients weighted per position."""
    if method == "gradcam":
        weights = grads.mean((2, 3), keepdim=True)
    else:
        g2, g3 = grads.pow(2), grads.pow(3)
        denominator = 2 * g2 + acts.sum((2, 3), keepdim=True) * g3
        alpha = torch.where(denominator != 0, g2 / torch.where(denominator != 0, denominator, 1.0), 0.0)
        weights = (alpha * F.relu(grads)).sum((2, 3), keepdim=True)
    return F.relu((weights * acts).sum(1))


def display_preprocessing(pre: Preprocessing) -> Preprocessing:
    """The model's crop drawn at a side of at least OVERLAY_MIN_SIDE (the same region of the photo)."""
    return pre if pre.input_size >= OVERLAY_MIN_SIDE else pre.at_size(OVERLAY_MIN_SIDE)


def explain_images(model: LoadedModel, files: list[tuple[str, bytes]], label: int | None = None,
                   method: str = "gradcam") -> list[Explanation]:
    """One explanation per uploaded image, in order; an unusable image is a 422 naming it."""
    pre, shown = model.preprocessing, display_preprocessing(model.preprocessing)
    crops, views = [], []
    for name, data in files:
        try:
            pixels = decode_pixels(data, draft_size=pre.resize_size)  # as /predict's decode_square
        except ImageRejected as exc:
            raise InvalidInput(f"file {name!r} is not a usable image: {exc}", filename=name) from None
        crops.append(eval_crop(square_u8(pixels, pre), pre))
        views.append(eval_crop(square_u8(pixels, shown), shown).contiguous())
    x = normalize(torch.stack(crops), pre)
    cams, probs, chosen = class_activation_maps(model, x, [label] * len(files), method)
    return [Explanation(chosen[i], probs[i], cams[i].detach(), views[i]) for i in range(len(files))]


# -- drawing -----------------------------------------------------------------------------------

_LUT: np.ndarray | None = None


def _colours() -> np.ndarray:
    """256 RGB colours of matplotlib's 'jet' (cold blue to hot red), read once."""
    global _LUT
    if _LUT is None:
        from matplotlib import colormaps  # matplotlib only for its colour table: no figure, no backend
        _LUT = (colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUT


def upsampled(cam: torch.Tensor, side: int) -> torch.Tensor:
    """The map at `side` x `side`, bilinear, scaled to [0, 1] by its maximum (all zero stays zero)."""
    big = F.interpolate(cam[None, None].float(), size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    peak = float(big.max())
    return big / peak if peak > 0 else big.clamp(min=0)


def overlay_png(e: Explanation) -> bytes:
    """The crop the model saw with the heatmap blended over it, as a PNG."""
    side = e.view.shape[-1]
    heat = (upsampled(e.cam, side).numpy() * 255).round().astype(np.uint8)
    photo = e.view.permute(1, 2, 0).numpy().astype(np.float32)
    blended = (1 - OVERLAY_ALPHA) * photo + OVERLAY_ALPHA * _colours()[heat].astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def explanation_json(e: Explanation, classes: list[str], filename: str, raw: bool, top_k: int = 3) -> dict:
    png = overlay_png(e)
    k = min(top_k, len(classes))
    scores, idx = e.probabilities.topk(k)
    out = {"filename": filename, "label": classes[e.label], "score": round(float(e.probabilities[e.label]), 6),
           "predictions": [{"label": classes[i], "score": round(float(s), 6)}
                           for s, i in zip(scores.tolist(), idx.tolist())],
           "overlay": {"media_type": "image/png", "width": e.view.shape[-1], "height": e.view.shape[-2],
                       "data": base64.b64encode(png).decode("ascii")}}
    if raw:
        out["heatmap"] = {"shape": list(e.cam.shape), "values": [[round(float(v), 6) for v in row] for row in e.cam]}
    return out
