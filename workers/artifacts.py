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
    """A pretrained feature extractor with a new classification layer grafted on."""

    def __init__(self, features: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


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
                    "sha256": digest}
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
    classifier = Classifier(spec.build_features(pretrained=False), spec.feature_dim, len(manifest["classes"]))
    classifier.load_state_dict(load_file(str(weights)), strict=True)
    classifier.eval().to(memory_format=torch.channels_last)
    return LoadedModel(classifier, manifest["classes"], Preprocessing.from_dict(manifest["preprocessing"]), manifest)
