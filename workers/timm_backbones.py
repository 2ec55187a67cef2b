"""Backbones beyond the built-in ones: any timm model (`timm/<model name>`) and the weight files an
operator registered (workers/backbone_registry.py).

Where the weights of `timm/<model>` come from, in this order and no other:

1. a file the operator registered under that name (`graft backbones add timm/<model> --file F`),
   checked against the sha256 recorded then;
2. the Hugging Face cache, read offline (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
   `~/.cache/huggingface/hub`): the model's repo (timm's `hf_hub_id`, e.g.
   `timm/convnext_small.fb_in22k_ft_in1k`), `model.safetensors`, else `pytorch_model.bin`; a blob
   named by its sha256 (as the hub stores large files) is checked against it;
3. a download from the Hugging Face Hub into that cache, only when GRAFT_ALLOW_DOWNLOADS is on.

Otherwise the job fails at once with WeightsUnavailable naming the file to provide. A registered
backbone with a name of its own (`graft backbones add NAME --file F --timm-arch ARCH`) reads only
its file.

Everything else comes from timm, never guessed: the preprocessing from the model's pretrained
config (input size, resize = floor(input / crop_pct), interpolation, mean and std: timm's own eval
transform), the feature dimension from the model, and the stages for partial fine-tuning from its
`feature_info` (each stage ends at one of the points timm reports features at).
"""
from __future__ import annotations

import functools
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from workers.backbone_registry import RegisteredBackbone, RegistryError, registered_backbones
from workers.backbones import (BackboneSpec, BackboneUnsupported, Preprocessing, WeightsMismatch,
                               WeightsUnavailable)

log = logging.getLogger("graft.backbones")

PREFIX = "timm/"
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # safetensors first, as timm itself prefers


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment now
    (huggingface_hub itself reads it once, at import)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


@dataclass(frozen=True)
class TimmSource:
    """A timm architecture and where its pretrained weights are read from."""

    arch: str  # timm model name with its pretrained tag
    hf_hub_id: str | None  # the Hugging Face repo of its weights
    hf_files: tuple[str, ...]  # the file names looked for in it, preferred first
    url: str | None  # weights hosted elsewhere (older timm tags): the torch hub cache
    family: str  # the model's class (EfficientNet, ResNet, ConvNeXt, VisionTransformer, ...)
    num_classes: int  # classes of the pretrained head (0: a features-only model)
    classifier: tuple[str, ...]  # module paths of that head
    registered: RegisteredBackbone | None = None  # the operator's file, read before anything else

    # --- where the weights are --------------------------------------------------------------------

    def weights_path(self) -> Path:
        """The file the weights are read from, or where they are expected when it is missing."""
        if self.registered is not None:
            return self.registered.path
        return self._cached_file() or self._expected_file()

    def _cached_file(self) -> Path | None:
        if self.hf_hub_id:
            from huggingface_hub import try_to_load_from_cache  # the cache on disk; never the network

            for name in self.hf_files:
                found = try_to_load_from_cache(self.hf_hub_id, name, cache_dir=str(hf_hub_cache()))
                if isinstance(found, str):
                    return Path(found)
            return None
        path = self._expected_file()
        return path if path.is_file() else None

    def _expected_file(self) -> Path:
        if self.hf_hub_id:
            return (hf_hub_cache() / f"models--{self.hf_hub_id.replace('/', '--')}" / "snapshots" / "<revision>"
                    / self.hf_files[0])
        return Path(torch.hub.get_dir()) / "checkpoints" / Path(self.url or self.arch).name

    def weights_key(self, name: str) -> str:
        """`name`, with the sha256 of the registered file or the cached blob's name (a revision's)."""
        if self.registered is not None:
            return f"{name}@{self.registered.sha256}"
        cached = self._cached_file()
        return f"{name}@{cached.resolve().name}" if cached is not None else name

    def missing_message(self, name: str) -> str:
        if self.registered is not None:
            return (f"the weights registered for backbone {name!r} are missing: {self.registered.file} is not "
                    f"there (sha256 {self.registered.sha256}); put that file back, or register another file "
                    f"under a new name with `graft backbones add`")
        if self.hf_hub_id:
            where = (f"put {self.hf_files[0]} of the Hugging Face repo {self.hf_hub_id} into the Hugging Face cache "
                     f"({self._expected_file()}; e.g. `hf download {self.hf_hub_id} {self.hf_files[0]}` on a "
                     f"machine with internet access, then copy {hf_hub_cache()})")
        else:
            where = f"copy {Path(self.url or '').name} (from {self.url}) to {self._expected_file()}"
        return (f"pretrained weights for backbone {name!r} are not on this machine: {where}; or register a "
                f"weights file with `graft backbones add timm/{self.arch} --file weights.safetensors`; or set "
                f"GRAFT_ALLOW_DOWNLOADS=1 to let Graft download them")

    def state_dict(self, name: str, allow_downloads: bool) -> dict[str, torch.Tensor]:
        """The weights, verified, in the resolution order above (raises WeightsUnavailable)."""
        if self.registered is not None:
            path = self.registered.path
            if not path.is_file():
                raise WeightsUnavailable(self.missing_message(name))
            _check_sha256(path, self.registered.sha256, f"the file registered for backbone {name!r} ({path})",
                          "put the registered file back, or register the new one under another name")
            return read_weights(path)
        path = self._cached_file()
        if path is None:
            if not allow_downloads:
                raise WeightsUnavailable(self.missing_message(name))
            path = self._download(name)
        blob = path.resolve()
        if re.fullmatch(r"[0-9a-f]{64}", blob.name):  # the hub names a large file's blob by its sha256
            _check_sha256(blob, blob.name, f"the cached weights of {name!r} ({path})",
                          "delete it from the cache and fetch it again")
        return read_weights(path)

    def _download(self, name: str) -> Path:
        log.info("downloading the weights of %s", name, extra={"action": "weights_download"})
        try:
            if not self.hf_hub_id:  # weights timm itself hosts elsewhere: into the torch hub cache, as timm would
                target = self._expected_file()
                target.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(self.url, str(target), progress=False)
                return target
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            for file in self.hf_files:
                try:
                    return Path(hf_hub_download(self.hf_hub_id, file, cache_dir=str(hf_hub_cache())))
                except EntryNotFoundError:
                    continue
            raise WeightsUnavailable(f"the Hugging Face repo {self.hf_hub_id} has none of {', '.join(self.hf_files)}")
        except WeightsUnavailable:
            raise
        except Exception as exc:  # no network, a proxy, a gated repo: say so, with the offline way
            raise WeightsUnavailable(f"downloading the weights of {name!r} failed ({type(exc).__name__}: {exc}); "
                                     + self.missing_message(name).split(": ", 1)[1]) from None

    # --- the network --------------------------------------------------------------------------------

    def features(self, pretrained: bool, allow_downloads: bool = False, name: str = "") -> nn.Module:
        """The model without its classifier: a normalized batch -> pooled features."""
        if not pretrained:
            return timm.create_model(self.arch, pretrained=False, num_classes=0).eval()
        model = self._pretrained(name or self.arch, allow_downloads)
        model.reset_classifier(0)
        return model.eval()

    def pretrained_classifier(self, name: str = "", allow_downloads: bool = False) -> nn.Module:
        if not self.num_classes:
            raise BackboneUnsupported(f"{self.arch}'s pretrained weights have no classifier")
        return self._pretrained(name or self.arch, allow_downloads).eval()

    def _pretrained(self, name: str, allow_downloads: bool) -> nn.Module:
        # Loaded by timm itself (its checkpoint filter adapts the layouts timm knows), strictly: every
        # tensor of the architecture must be in the file. A file without the pretrained classifier
        # (saved from a features-only model) gets zeros there, dropped right after.
        state = self.state_dict(name, allow_downloads)
        self._fill_classifier(state)
        try:
            return timm.create_model(self.arch, pretrained=True, num_classes=self.num_classes,
                                     pretrained_cfg_overlay={"state_dict": state})
        except RuntimeError as exc:
            detail = str(exc).strip().splitlines()
            raise WeightsMismatch(f"{self.weights_path()} does not hold weights of the timm architecture {self.arch} "
                                  f"(backbone {name!r}): {' '.join(line.strip() for line in detail[:3])[:600]}") from None

    def _fill_classifier(self, state: dict[str, torch.Tensor]) -> None:
        keys = [f"{c}.{leaf}" for c in self.classifier for leaf in ("weight", "bias")]
        if not self.num_classes or any(k in state for k in keys):
            return
        reference = _meta_model(self.arch, self.num_classes).state_dict()
        for k in keys:
            if k in reference:
                state[k] = torch.zeros(reference[k].shape, dtype=reference[k].dtype)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file: safetensors, or a PyTorch file by torch.load(weights_only=True)
    (tensors only, nothing unpickled beyond them); {"state_dict": ...} and {"model": ...} unwrapped."""
    if path.suffix == ".safetensors" or path.name == "model.safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise WeightsMismatch(f"{path} is not a readable safetensors file: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsMismatch(f"{path} is not a PyTorch state dict that loads with weights_only=True: "
                              f"{type(exc).__name__}: {str(exc)[:300]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatch(f"{path} holds no state dict of tensors")
    return dict(state)


def _check_sha256(path: Path, expected: str, what: str, fix: str) -> None:
    from workers.artifacts import sha256_file  # artifacts imports the backbone registry

    actual = sha256_file(path)
    if actual != expected:
        raise WeightsMismatch(f"{what} has sha256 {actual}, not the {expected} recorded for it: the file changed; {fix}")


# --- specs ----------------------------------------------------------------------------------------

def find_backbone(name: str) -> BackboneSpec | None:
    """The spec of a registered backbone or of `timm/<model>`; None when the name is neither.
    Raises BackboneUnsupported for a timm model Graft cannot use (the reason in the message)."""
    registry = registered_backbones()
    if name.startswith(PREFIX):
        arch = canonical_arch(name[len(PREFIX):])
        if arch is None:
            return None
        canonical = PREFIX + arch
        return timm_spec(canonical, arch, registry.get(canonical) or registry.get(name))
    entry = registry.get(name)
    return timm_spec(name, entry.timm_arch, entry) if entry is not None else None


def canonical_arch(model: str) -> str | None:
    """`convnext_small` -> `convnext_small.fb_in22k_ft_in1k` (timm's default tag); None when timm has
    no pretrained config of that name."""
    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:  # RuntimeError from timm for a malformed name
        return None
    if cfg is None or not cfg.architecture or not timm.is_model(cfg.architecture):
        return None
    return f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture


@functools.lru_cache(maxsize=256)
def timm_spec(name: str, arch: str, registered: RegisteredBackbone | None = None) -> BackboneSpec:
    """The spec of timm model `arch` (tagged) under `name`, its weights from `registered` when given."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise BackboneUnsupported(f"backbone {name!r}: timm {timm.__version__} has no pretrained config for {arch!r}; "
                                  "give a timm model name with its pretrained tag (timm.list_pretrained())")
    pre = preprocessing_of(name, cfg)
    model = _meta_model(arch, 0)
    feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)
    classifier = cfg.classifier if isinstance(cfg.classifier, (tuple, list)) else (cfg.classifier,)
    hf_files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES
    source = TimmSource(arch=arch, hf_hub_id=cfg.hf_hub_id or None, hf_files=hf_files, url=cfg.url or None,
                        family=type(model).__name__, num_classes=int(cfg.num_classes or 0),
                        classifier=tuple(c for c in classifier if c), registered=registered)
    if source.hf_hub_id is None and source.url is None and registered is None:
        raise BackboneUnsupported(f"backbone {name!r}: timm knows no place to get {arch}'s weights from; register a "
                                  f"file for it with `graft backbones add`")
    return BackboneSpec(name, feature_dim, pre, head="", stage_groups=stage_groups_of(model), timm=source,
                        fixed_input_size=bool(cfg.fixed_input_size))


def preprocessing_of(name: str, cfg) -> Preprocessing:
    """timm's eval transform for a pretrained config: shorter side to floor(size / crop_pct), then a
    centre crop of size (timm.data.create_transform with the config's resolve_data_config)."""
    channels, height, width = cfg.input_size
    if channels != 3 or height != width:
        raise BackboneUnsupported(f"backbone {name!r} takes {channels}x{height}x{width} input; Graft feeds square "
                                  "RGB crops")
    crop_mode = getattr(cfg, "crop_mode", None) or "center"
    if crop_mode != "center":
        raise BackboneUnsupported(f"backbone {name!r} was evaluated with crop_mode {crop_mode!r}; Graft resizes "
                                  "the shorter side and centre-crops ('center')")
    if cfg.interpolation not in ("bicubic", "bilinear"):
        raise BackboneUnsupported(f"backbone {name!r} uses {cfg.interpolation!r} interpolation; Graft resizes "
                                  "bicubic or bilinear")
    crop_pct = cfg.crop_pct or 0.875  # timm's DEFAULT_CROP_PCT when a config has none
    return Preprocessing(height, math.floor(height / crop_pct), tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)


@functools.lru_cache(maxsize=64)
def _meta_model(arch: str, num_classes: int) -> nn.Module:
    """The architecture without memory (the meta device): for its shapes and structure only."""
    try:
        with torch.device("meta"):
            return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except Exception:  # an initialiser that reads values: build it for real once
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)


def stage_groups_of(model: nn.Module) -> tuple[str, ...]:
    """Stages from timm's feature_info: each ends at a module timm reports features at, holding every
    module (and parameter) from the previous one on; what follows the last one (final conv or norm,
    a head's norm) is one more stage, up to its last module with parameters (pooling and an Identity
    classifier are in no stage). Together they hold every parameter, in order."""
    points = {f["module"] for f in getattr(model, "feature_info", []) or [] if f.get("module")}
    units: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        units.extend(prefix + p for p in module._parameters if module._parameters[p] is not None)
        for child_name, child in module.named_children():
            path = prefix + child_name
            if any(p.startswith(path + ".") for p in points):
                walk(child, path + ".")  # a container of stages (blocks, stages): one unit per child
            else:
                units.append(path)
    walk(model, "")
    groups, current = [], []
    for unit in units:
        current.append(unit)
        if unit in points:
            groups.append(current)
            current = []
    while current and not _has_params(model, current[-1]):
        current.pop()  # a parameter-free tail (pooling, an Identity head): a stage's last module is its output
    if current or not groups:
        groups.append(current or units)
    return tuple(" ".join(g) for g in groups)


def _has_params(model: nn.Module, path: str) -> bool:
    parent, _, leaf = path.rpartition(".")
    owner = model.get_submodule(parent)
    if leaf in owner._parameters:
        return True
    return any(True for _ in model.get_submodule(path).parameters())


# --- the operator's registrations and the machine's caches ------------------------------------------

def register(registry_file: Path, name: str, file: Path, timm_arch: str | None, builtin: set[str],
             auto: bool = False) -> BackboneSpec:
    """Check and record a weights file: the name is free, the file loads strictly into the architecture,
    its sha256 is recorded. Returns the new backbone's spec."""
    from workers import backbone_registry as registry
    from workers.artifacts import sha256_file

    if name.startswith(PREFIX):
        arch = canonical_arch(name[len(PREFIX):])
        if arch is None:
            raise RegistryError(f"timm {timm.__version__} has no pretrained model {name[len(PREFIX):]!r}")
        if timm_arch and canonical_arch(timm_arch) != arch:
            raise RegistryError(f"{name} is timm's {arch}: leave --timm-arch out, or register under a name of "
                                "your own")
        name = PREFIX + arch
    else:
        if not timm_arch:
            raise RegistryError(f"backbone {name!r}: say which timm architecture the file is for (--timm-arch, "
                                "a timm model name with its pretrained tag, whose config gives the preprocessing)")
        arch = canonical_arch(timm_arch)
        if arch is None:
            raise RegistryError(f"timm {timm.__version__} has no pretrained model {timm_arch!r} (its config gives the "
                                "preprocessing): see timm.list_pretrained()")
    registry.check_name(name, builtin)
    file = registry.check_file(file)
    if name in registry.read_registry(registry_file):
        raise RegistryError(f"backbone {name!r} is already registered in {registry_file}; models trained on it "
                            "expect that file: register the new one under another name")
    entry = registry.new_entry(name, arch, file, sha256_file(file), auto=auto)
    spec = timm_spec.__wrapped__(name, arch, entry)  # not cached: it may be refused
    spec.build_features(pretrained=True)  # the file loads into the architecture, or this raises
    registry.write_entry(registry_file, entry)
    return spec


def cached_timm_backbones() -> list[str]:
    """`timm/<model>` names whose weights are in the Hugging Face cache (repos `timm/<model>`)."""
    root = hf_hub_cache()
    if not root.is_dir():
        return []
    names = []
    for repo in sorted(root.glob("models--timm--*")):
        model = repo.name[len("models--timm--"):]
        try:
            arch = canonical_arch(model)
            if arch and timm_spec(PREFIX + arch, arch, None).weights_available():
                names.append(PREFIX + arch)
        except BackboneUnsupported:
            continue
    return names
