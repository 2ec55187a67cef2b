"""The model artifact format: `model.safetensors` + `manifest.json`, verified by sha256 on load.

Nothing here unpickles: weights are safetensors, everything else is JSON.

Format 2: when the classifier's backbone is bit-identical to the pristine pretrained one (a linear
probe never changes it), model.safetensors holds only the head, and the manifest's
`backbone_weights` = {"source": "pretrained", "sha256": <backbone fingerprint>}; loading takes the
backbone from a process-wide registry, so every such model on one backbone shares one frozen copy.
Otherwise (fine-tuning, AdaBN) the file holds every tensor as in format 1 ({"source": "artifact"}).
Format 1 artifacts (always full) still load.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file
from torch import nn

from workers.backbones import Preprocessing, WeightsUnavailable, get_backbone

FORMAT_VERSION = 2
WEIGHTS_FILE, MANIFEST_FILE = "model.safetensors", "manifest.json"
BACKBONE_PREFIX = "features."  # Classifier.features' keys in a state dict


def mirror_averaged(logits: torch.Tensor, mirrored: torch.Tensor | None) -> torch.Tensor:
    """tta_flip: an image's logits averaged with its mirror image's (None: no mirror, unchanged)."""
    return logits if mirrored is None else (logits + mirrored) / 2


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temperature-scaled softmax: the calibrated class probabilities Graft reports and serves."""
    return torch.softmax(logits / temperature, dim=1)


def multi_label_probabilities(logits: torch.Tensor, scale: list[float] | None, bias: list[float] | None) -> torch.Tensor:
    """Issue 17: each label's calibrated probability, sigmoid(logit * scale + bias) (Platt scaling per
    label; None: uncalibrated). The constants become part of an exported graph."""
    if scale is not None and bias is not None and len(scale) == logits.shape[-1]:
        logits = logits * torch.tensor(scale, dtype=logits.dtype, device=logits.device) \
            + torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    return torch.sigmoid(logits)


class Classifier(nn.Module):
    """A pretrained feature extractor with a new classification head grafted on.

    head "linear": one Linear layer (state keys `head.weight`, `head.bias`, as in format 1's first
    models); "mlp": Linear -> ReLU -> Dropout -> Linear. Dropout on the head's inputs has no
    parameters, so it lives outside `head`. `temperature` (calibration) and `tta_flip` (average
    with the mirror image) are serving settings: they travel in the manifest's "serving" entry.
    """

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int, head: str = "linear",
                 hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.features = features
        self.head_kind, self.hidden_dim, self.dropout_p = head, hidden_dim, float(dropout)
        self.input_dropout = nn.Dropout(dropout)
        if head == "linear":
            self.head = nn.Linear(feature_dim, num_classes)
        elif head == "mlp":
            hidden = hidden_dim or 512
            self.hidden_dim = hidden
            self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', not {head!r}")
        self.temperature = 1.0
        self.tta_flip = False
        self.ood = None  # issue 17: an OutOfDistribution (workers/ood.py) once fitted; None: never unknown
        # Issue 17, multi-label: a sigmoid per label, calibrated per label (Platt: sigmoid(logit *
        # label_scale + label_bias)); a label is predicted at or over its threshold (on that score).
        self.multi_label = False
        self.label_scale: list[float] | None = None
        self.label_bias: list[float] | None = None
        self.thresholds: list[float] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_logits(self.features(x))

    def head_logits(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.input_dropout(feats))

    def head_with_representation(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the representation the final Linear reads (for feature_l1)."""
        z = self.input_dropout(feats)
        if self.head_kind == "linear":
            return self.head(z), feats
        hidden = self.head[1](self.head[0](z))
        return self.head[3](self.head[2](hidden)), hidden

    def serving_config(self) -> dict:
        return {"head": self.head_kind, "hidden_dim": self.hidden_dim, "dropout": self.dropout_p,
                "temperature": float(self.temperature), "tta_flip": bool(self.tta_flip),
                **({"ood": self.ood.config()} if self.ood is not None else {}),
                **({"multi_label": True, "label_scale": list(self.label_scale or []),
                    "label_bias": list(self.label_bias or []), "thresholds": list(self.thresholds or [])}
                   if self.multi_label else {})}

    def serve(self, logits: torch.Tensor, mirrored: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The serving arithmetic, in one place for training's evaluation, /predict and exports:
        (logits mirror-averaged when tta_flip, calibrated probabilities; multi-label: per label)."""
        logits = mirror_averaged(logits, mirrored if self.tta_flip else None)
        if self.multi_label:
            return logits, multi_label_probabilities(logits, self.label_scale, self.label_bias)
        return logits, calibrated_probabilities(logits, self.temperature)

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities for a normalized batch, mirror-averaged when tta_flip."""
        return self.serve(self(x).float(), self(x.flip(-1)).float() if self.tta_flip else None)[1]


class ArtifactCorrupt(Exception):
    """The stored file does not match the sha256 recorded when it was written (or its backbone
    does not match the pretrained weights it was written against)."""


class BackboneMismatch(ArtifactCorrupt):
    """This machine's pretrained backbone is not the one a shared-backbone model was trained on;
    str(exc) names no server path and says what to do."""


def backbone_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a backbone state dict serialized by safetensors: deterministic and layout-free
    (contiguous copies, so a channels_last module hashes like its NCHW twin)."""
    return hashlib.sha256(save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})).hexdigest()


# spec.weights_key (the name; with a registered file's sha256) -> fingerprint of the pristine
# pretrained backbone, computed once per process.
_PRETRAINED_FINGERPRINTS: dict[str, str] = {}
# (name, fingerprint) -> the one shared backbone module. Weak: it lives as long as a loaded model
# uses it, so evicting the last such model from a cache frees it.
_SHARED_BACKBONES: weakref.WeakValueDictionary[tuple[str, str], nn.Module] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()  # two threads loading models at once must get the same module


def pretrained_fingerprint(name: str, pristine: nn.Module | None = None) -> str:
    """Fingerprint of backbone `name`'s pristine ImageNet weights (raises WeightsUnavailable).
    A caller that already built them passes `pristine`, so they are not read a second time."""
    key = get_backbone(name).weights_key
    with _REGISTRY_LOCK:
        if key not in _PRETRAINED_FINGERPRINTS:
            features = pristine if pristine is not None else get_backbone(name).build_features(pretrained=True)
            _PRETRAINED_FINGERPRINTS[key] = backbone_fingerprint(features.state_dict())
        return _PRETRAINED_FINGERPRINTS[key]


def shared_backbone(name: str, fingerprint: str, allow_downloads: bool = False) -> nn.Module:
    """The process-wide frozen, eval-mode, channels_last copy of `name`'s pretrained backbone.

    Raises BackboneMismatch (an ArtifactCorrupt) when this machine's pretrained weights are not
    the ones the model was trained on, and WeightsUnavailable when they are missing.
    """
    key = get_backbone(name).weights_key
    with _REGISTRY_LOCK:
        module = _SHARED_BACKBONES.get((name, fingerprint))
        if module is not None:
            return module
        known = _PRETRAINED_FINGERPRINTS.get(key)
        if known is None:
            module = get_backbone(name).build_features(pretrained=True, allow_downloads=allow_downloads)
            known = _PRETRAINED_FINGERPRINTS[key] = backbone_fingerprint(module.state_dict())
        if known != fingerprint:
            raise BackboneMismatch(
                f"the model was trained on {name} weights with fingerprint {fingerprint[:16]}…, but this "
                f"machine's pretrained {name} weights have fingerprint {known[:16]}…; retrain the model "
                f"or install the weights it was trained with")
        if module is None:  # fingerprint known from an earlier build that has since been freed
            module = get_backbone(name).build_features(pretrained=True, allow_downloads=allow_downloads)
        module.requires_grad_(False)
        module.eval().to(memory_format=torch.channels_last)
        _SHARED_BACKBONES[(name, fingerprint)] = module
        return module


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    return sum(t.nelement() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(models_dir: Path, model_id: str, classifier: Classifier, manifest: dict,
                   extra: dict[str, bytes] | None = None) -> tuple[Path, str, int]:
    """Write into a temp folder, then rename: a reader never sees half a model.

    A backbone identical to manifest["backbone"]'s pretrained weights is left out of the file.
    `extra` files (name -> bytes: the held-out predictions, workers/evaluation.py) go into the same
    folder, their sha256s into the manifest's "files".
    """
    final = models_dir / model_id
    tmp = models_dir / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
        fingerprint = backbone_fingerprint({k[len(BACKBONE_PREFIX):]: v for k, v in state.items()
                                            if k.startswith(BACKBONE_PREFIX)})
        try:
            pristine = pretrained_fingerprint(manifest["backbone"])
        except WeightsUnavailable:
            pristine = None  # cannot prove the backbone is pretrained: store it
        if fingerprint == pristine:
            state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
            backbone_weights = {"source": "pretrained", "sha256": fingerprint}
        else:
            backbone_weights = {"source": "artifact", "sha256": fingerprint}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"graft_format": str(FORMAT_VERSION)})
        digest = sha256_file(tmp / WEIGHTS_FILE)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
                    "sha256": digest, "serving": classifier.serving_config(),
                    "backbone_weights": backbone_weights}
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
            manifest.setdefault("files", {})[name] = hashlib.sha256(data).hexdigest()
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, digest, (final / WEIGHTS_FILE).stat().st_size


@dataclass
class LoadedModel:
    classifier: Classifier
    classes: list[str]
    preprocessing: Preprocessing
    manifest: dict
    # The registry's module when classifier.features is shared with other models (never modify
    # it in place: copy the classifier first); None when the model owns its backbone.
    shared_backbone: nn.Module | None = None

    @property
    def own_bytes(self) -> int:
        """Memory of the weights only this model holds (a shared backbone is not counted)."""
        total = weight_bytes(self.classifier)
        return total - weight_bytes(self.shared_backbone) if self.shared_backbone is not None else total


def load_artifact(artifact_dir: Path, expected_sha256: str, *, allow_downloads: bool = False) -> LoadedModel:
    """Verify and load a model (raises ArtifactCorrupt, FileNotFoundError, WeightsUnavailable)."""
    weights = artifact_dir / WEIGHTS_FILE
    actual = sha256_file(weights)
    if actual != expected_sha256:
        raise ArtifactCorrupt(f"{weights} has sha256 {actual}, expected {expected_sha256}")
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    version = int(manifest.get("format_version", 1))
    if version > FORMAT_VERSION:
        raise ArtifactCorrupt(f"{artifact_dir} is artifact format {version}; this Graft reads up to {FORMAT_VERSION}")
    spec = get_backbone(manifest["backbone"])
    serving = manifest.get("serving", {})  # absent in models written before heads and calibration
    source = manifest.get("backbone_weights", {}).get("source", "artifact")  # format 1: always in the file
    if source == "pretrained":
        shared = shared_backbone(spec.name, manifest["backbone_weights"]["sha256"], allow_downloads)
        features = shared
    elif source == "artifact":
        shared, features = None, spec.build_features(pretrained=False)
    else:
        raise ArtifactCorrupt(f"{artifact_dir}: unknown backbone_weights source {source!r}")
    classifier = Classifier(features, spec.feature_dim, len(manifest["classes"]),
                            head=serving.get("head", "linear"), hidden_dim=serving.get("hidden_dim"),
                            dropout=serving.get("dropout", 0.0))
    state = load_file(str(weights))
    if serving.get("multi_label"):  # issue 17: sigmoid per label, calibrated per label, thresholds
        classifier.multi_label = True
        classifier.label_scale = [float(v) for v in serving.get("label_scale") or []] or None
        classifier.label_bias = [float(v) for v in serving.get("label_bias") or []] or None
        classifier.thresholds = [float(v) for v in serving.get("thresholds") or []] or None
    if serving.get("ood"):  # its tensors are in the weights file (sha256-verified above)
        from workers.ood import OutOfDistribution
        try:
            classifier.ood = OutOfDistribution.from_manifest(serving["ood"], manifest["classes"], state)
        except (KeyError, ValueError, TypeError) as exc:
            raise ArtifactCorrupt(f"{artifact_dir}: unreadable out-of-distribution score: {exc}") from None
    if shared is None:
        classifier.load_state_dict(state, strict=True)
        classifier.eval().to(memory_format=torch.channels_last)
    else:
        # Strict on the head; the backbone keys are absent by design and must stay untouched.
        expected = {k for k in classifier.state_dict() if not k.startswith(BACKBONE_PREFIX)}
        if set(state) != expected:
            raise ArtifactCorrupt(f"{weights} holds tensors {sorted(state)}, expected the head's {sorted(expected)}")
        classifier.load_state_dict(state, strict=False)
        classifier.eval()  # the head has no 4-D tensors, and the shared module is already channels_last
    classifier.temperature = float(serving.get("temperature", 1.0))
    classifier.tta_flip = bool(serving.get("tta_flip", False))
    return LoadedModel(classifier, manifest["classes"], Preprocessing.from_dict(manifest["preprocessing"]), manifest,
                       shared_backbone=shared)
