"""The model artifact format: `model.safetensors` + `manifest.json`, verified by sha256 on load.

Nothing here unpickles: weights are safetensors, everything else is JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workers.backbones import Preprocessing, get_backbone

FORMAT_VERSION = 1
WEIGHTS_FILE, MANIFEST_FILE = "model.safetensors", "manifest.json"


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
                "temperature": float(self.temperature), "tta_flip": bool(self.tta_flip)}

    @torch.inference_mode()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities for a normalized batch, mirror-averaged when tta_flip."""
        logits = self(x).float()
        if self.tta_flip:
            logits = (logits + self(x.flip(-1)).float()) / 2
        return torch.softmax(logits / self.temperature, dim=1)


class ArtifactCorrupt(Exception):
    """The stored file does not match the sha256 recorded when it was written."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(models_dir: Path, model_id: str, classifier: Classifier, manifest: dict) -> tuple[Path, str, int]:
    """Write into a temp folder, then rename: a reader never sees half a model."""
    final = models_dir / model_id
    tmp = models_dir / f".tmp-{model_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"graft_format": str(FORMAT_VERSION)})
        digest = sha256_file(tmp / WEIGHTS_FILE)
        manifest = {**manifest, "format_version": FORMAT_VERSION, "weights_file": WEIGHTS_FILE,
                    "sha256": digest, "serving": classifier.serving_config()}
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


def load_artifact(artifact_dir: Path, expected_sha256: str) -> LoadedModel:
    weights = artifact_dir / WEIGHTS_FILE
    actual = sha256_file(weights)
    if actual != expected_sha256:
        raise ArtifactCorrupt(f"{weights} has sha256 {actual}, expected {expected_sha256}")
    manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text())
    spec = get_backbone(manifest["backbone"])
    serving = manifest.get("serving", {})  # absent in models written before heads and calibration
    classifier = Classifier(spec.build_features(pretrained=False), spec.feature_dim, len(manifest["classes"]),
                            head=serving.get("head", "linear"), hidden_dim=serving.get("hidden_dim"),
                            dropout=serving.get("dropout", 0.0))
    classifier.load_state_dict(load_file(str(weights)), strict=True)
    classifier.temperature = float(serving.get("temperature", 1.0))
    classifier.tta_flip = bool(serving.get("tta_flip", False))
    classifier.eval().to(memory_format=torch.channels_last)
    return LoadedModel(classifier, manifest["classes"], Preprocessing.from_dict(manifest["preprocessing"]), manifest)
