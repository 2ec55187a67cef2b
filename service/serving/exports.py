"""Models packaged to take away: ONNX, safetensors or TorchScript, each with its manifest.

An export is a zip of the model file, `manifest.json` (the artifact's manifest — backbone,
classes, preprocessing, metrics — plus an `export` section describing the file's input and
outputs) and a short USAGE.md. The network takes a normalized float32 NCHW batch and returns
`logits` and `probabilities` (softmax), so a runtime needs no Graft code beyond the
preprocessing written in the manifest. Exports are built once per model and format and cached
under `<data dir>/exports`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from service.enums import ExportFormat
from service.settings import Settings
from service.store.objects import StorageUnavailable, store_for
from service.store.tables import Model
from workers.artifacts import (FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, Classifier, LoadedModel, load_artifact,
                               sha256_file)
from workers.ood import NEGATIVE_LABEL

MODEL_FILES: dict[str, str] = {"onnx": "model.onnx", "safetensors": WEIGHTS_FILE, "torchscript": "model.torchscript.pt"}
INPUT_NAME, OUTPUT_NAMES = "input", ("logits", "probabilities")
OOD_OUTPUT = "ood_score"  # a third output, for models that keep an out-of-distribution score (issue 17)
_EXPORT_LOCK = threading.Lock()  # exporters trace the model; one export at a time is plenty


class WithProbabilities(nn.Module):
    """The classifier as /predict serves it (Classifier.serve): logits averaged with the mirror
    image's when the model was trained with tta_flip, and probabilities = softmax(logits /
    temperature), the calibrated scores. The exported graph answers both."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c = self.classifier
        feats = c.features(x)
        mirrored_feats = c.features(x.flip(-1)) if c.tta_flip else None
        logits, probs = c.serve(c.head_logits(feats), c.head_logits(mirrored_feats) if c.tta_flip else None)
        if getattr(c, "ood", None) is None:
            return logits, probs
        # Issue 17: the out-of-distribution score /predict compares with the threshold (export.ood).
        return logits, probs, c.ood.score(logits, c.temperature, feats, mirrored_feats)


class Exporter:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.exports_dir

    def export(self, row: Model, fmt: ExportFormat) -> Path:
        """The zip for this model and format, built on first request (raises ArtifactCorrupt)."""
        target = self.root / f"{row.id}-{row.sha256[:16]}-{fmt}.zip"
        storage, key = store_for(self.settings), self.settings.relative_to_data(target)
        if target.is_file():  # here (with an object store: cached here once committed)
            return target
        with _EXPORT_LOCK:
            try:
                return storage.fetch(key)  # built before, here or on another machine
            except FileNotFoundError:
                pass
            self.root.mkdir(parents=True, exist_ok=True)
            artifact_dir = storage.fetch_files(row.artifact_dir, (WEIGHTS_FILE, MANIFEST_FILE))
            loaded = _standalone(load_artifact(artifact_dir, row.sha256))  # verifies sha256
            with tempfile.TemporaryDirectory(dir=self.root, prefix=".tmp-") as tmp:
                model_file = Path(tmp) / MODEL_FILES[fmt]
                details = _WRITERS[fmt](loaded, artifact_dir, model_file)
                manifest = export_manifest(loaded, fmt, model_file, details)
                zip_tmp = Path(tmp) / "export.zip"
                with zipfile.ZipFile(zip_tmp, "w", zipfile.ZIP_DEFLATED) as zf:
                    zf.write(model_file, model_file.name)
                    zf.writestr(MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True))
                    zf.writestr("USAGE.md", usage_text(manifest))
                os.replace(zip_tmp, target)  # readers see a whole zip or none
            try:
                storage.commit(key)
            except StorageUnavailable:
                target.unlink(missing_ok=True)  # not stored: the next request builds it again
                raise
        return target


def _standalone(loaded: LoadedModel) -> LoadedModel:
    # A shared backbone is also serving /predict in this process: exporters change its memory
    # layout, so they work on a private copy (which is also what makes the export whole).
    if loaded.shared_backbone is None:
        return loaded
    return dataclasses.replace(loaded, classifier=copy.deepcopy(loaded.classifier), shared_backbone=None)


def _example(loaded: LoadedModel, batch: int = 2) -> torch.Tensor:
    size = loaded.preprocessing.input_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def output_names(loaded: LoadedModel) -> list[str]:
    return [*OUTPUT_NAMES, *([OOD_OUTPUT] if getattr(loaded.classifier, "ood", None) is not None else [])]


def _plain(loaded: LoadedModel) -> nn.Module:
    # NCHW in the exported graph: the layout a runtime is fed, whatever the server runs in.
    return WithProbabilities(loaded.classifier.to(memory_format=torch.contiguous_format)).eval()


def _write_onnx(loaded: LoadedModel, _artifact_dir: Path, out: Path) -> dict:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_plain(loaded), (_example(loaded),), str(out), dynamo=True, external_data=False,
                          input_names=[INPUT_NAME], output_names=output_names(loaded),
                          dynamic_shapes=({0: batch},), verbose=False)
    proto = onnx.load(str(out), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "ir_version": proto.ir_version}


def _write_torchscript(loaded: LoadedModel, _artifact_dir: Path, out: Path) -> dict:
    with torch.no_grad():
        traced = torch.jit.trace(_plain(loaded), _example(loaded), check_trace=False)
    torch.jit.save(traced, str(out))
    return {"load_with": "torch.jit.load(path, map_location='cpu')"}


def _write_safetensors(loaded: LoadedModel, artifact_dir: Path, out: Path) -> dict:
    if loaded.manifest.get("backbone_weights", {}).get("source") == "pretrained":
        # The artifact holds only the head: write the whole network, so the file works without Graft.
        state = {k: v.detach().contiguous() for k, v in loaded.classifier.state_dict().items()}
        save_file(state, str(out), metadata={"graft_format": str(FORMAT_VERSION)})
    else:
        # The artifact's own weights file, byte for byte (its sha256 was just verified).
        out.write_bytes((artifact_dir / WEIGHTS_FILE).read_bytes())
    return {"state_dict": "Graft's Classifier: features.* = the backbone without its ImageNet "
                          "classifier, head.* = Linear(feature_dim, num_classes); softmax not included"}


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}


def export_manifest(loaded: LoadedModel, fmt: str, model_file: Path, details: dict) -> dict:
    pre = loaded.preprocessing
    size = pre.input_size
    io_spec = {} if fmt == "safetensors" else {
        "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": ["batch", 3, size, size]},
        "outputs": [{"name": OUTPUT_NAMES[0], "dtype": "float32", "shape": ["batch", len(loaded.classes)]},
                    {"name": OUTPUT_NAMES[1], "dtype": "float32", "shape": ["batch", len(loaded.classes)],
                     "note": "softmax(logits / temperature): the calibrated scores /predict returns"}],
        "temperature": float(getattr(loaded.classifier, "temperature", 1.0)),
        "tta_flip": bool(getattr(loaded.classifier, "tta_flip", False)),
    }
    ood = getattr(loaded.classifier, "ood", None)
    if ood is not None and io_spec:
        io_spec["outputs"].append({"name": OOD_OUTPUT, "dtype": "float32", "shape": ["batch"],
                                   "note": "the out-of-distribution score: unknown below export.ood.threshold"})
    if ood is not None:
        io_spec["ood"] = {**ood.config(), "rule": (
            f"unknown (none of the classes) when the score is below the threshold, or when the top class is "
            f"{NEGATIVE_LABEL!r}"), "parameters": "ood.* tensors in the weights (cosine: center, means)"}
    c = loaded.classifier
    if getattr(c, "multi_label", False):  # issue 17: sigmoid per label, and each label's threshold
        if io_spec:
            io_spec["outputs"][1]["note"] = ("sigmoid(logits * label_scale + label_bias) per label (Platt "
                                             "calibration): the scores /predict returns")
        io_spec["multi_label"] = {
            "rule": "a label is predicted when its probability is at or over its threshold (any number of labels, "
                    "maybe none)",
            "thresholds": {label: float(t) for label, t in zip(loaded.classes, c.thresholds or [])},
            "label_scale": list(c.label_scale or []), "label_bias": list(c.label_bias or [])}
    return {**loaded.manifest, "export": {
        "format": fmt, "file": model_file.name, "file_sha256": sha256_file(model_file),
        "torch_version": torch.__version__, **io_spec, **details,
        "preprocessing_steps": [
            "decode to RGB, applying the EXIF orientation",
            f"resize so the shorter side is {pre.resize_size} px ({pre.interpolation})",
            f"center-crop {size}x{size}",
            "scale pixel values to [0, 1]",
            f"subtract mean {list(pre.mean)} and divide by std {list(pre.std)}, per RGB channel",
        ],
    }}


def usage_text(manifest: dict) -> str:
    exp = manifest["export"]
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(exp["preprocessing_steps"], 1))
    text = (f"# Graft model {manifest.get('model_id', '')}\n\n"
            f"Backbone `{manifest['backbone']}`, classes {manifest['classes']} (output index order).\n"
            f"File `{exp['file']}` ({exp['format']}); everything about it is in manifest.json.\n\n"
            f"## Preprocessing (the same as Graft's validation and prediction)\n\n{steps}\n")
    if exp["format"] == "onnx":
        text += (
            "\n## Run with onnxruntime\n\n```python\nimport json, numpy as np, onnxruntime as ort\n"
            "from PIL import Image, ImageOps\n"
            "m = json.load(open('manifest.json')); p = m['preprocessing']\n"
            "img = ImageOps.exif_transpose(Image.open('photo.jpg')).convert('RGB')\n"
            "s = p['resize_size'] / min(img.size)\n"
            "r = p['resize_size']; size = (max(r, round(img.width * s)), max(r, round(img.height * s)))\n"
            "img = img.resize(size, Image.BICUBIC if p['interpolation'] == 'bicubic' else Image.BILINEAR)\n"
            "c = p['input_size']; left, top = (img.width - c) // 2, (img.height - c) // 2\n"
            "x = np.asarray(img.crop((left, top, left + c, top + c)), np.float32) / 255\n"
            "x = ((x - p['mean']) / p['std']).transpose(2, 0, 1)[None].astype(np.float32)\n"
            "outputs = ort.InferenceSession('model.onnx').run(None, {'input': x})\n"
            "probs = outputs[1]  # [logits, probabilities] (, ood_score when the model keeps one)\n"
            "print(m['classes'][int(probs[0].argmax())], float(probs[0].max()))\n"
            "ood = m['export'].get('ood')  # \"none of these\": unknown below its threshold\n"
            "if ood and float(outputs[2][0]) < ood['threshold']:\n"
            "    print('unknown: none of the classes')\n```\n")
    return text
