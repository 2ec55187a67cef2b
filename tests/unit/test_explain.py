"""Grad-CAM (service/serving/explain.py): it points at what decides the class, on every backbone,
and a base model's head seeds a new one by label (workers/base_model.py)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.serving.explain import display_preprocessing, explain_images, stage_outputs, upsampled
from tests.support.training import one_thread  # noqa: F401  (fixture)
from workers.artifacts import Classifier, LoadedModel
from workers.backbones import BACKBONES, get_backbone
from workers.base_model import BaseStart, class_changes, trained_ids
from workers.preprocessing import decode_square, eval_crop, normalize
from workers.training import logistic

SIDE, PATCH = 256, 64  # photo side and the deciding patch's, in pixels (Lite0 at 224 px: a 7x7 map)


def photo(rng, patch: bool) -> tuple[bytes, tuple[int, int]]:
    """Grey noise; with `patch`, a red square at a random place (its top-left corner returned)."""
    img = rng.integers(90, 166, (SIDE, SIDE, 3)).astype(np.uint8)
    y, x = (int(v) for v in rng.integers(0, SIDE - PATCH, 2))
    if patch:
        img[y:y + PATCH, x:x + PATCH] = (230, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue(), (y, x)


@pytest.fixture(scope="module")
def patch_model(one_thread):
    """Lite0 features + a logistic head fitted on 16 photos with the red patch and 16 without."""
    spec = get_backbone("efficientnet_lite0")
    pre = spec.preprocessing
    rng = np.random.default_rng(0)
    data = [(photo(rng, c == 0)[0], c) for _ in range(16) for c in (0, 1)]
    features = spec.build_features(pretrained=True)
    x = torch.stack([eval_crop(decode_square(b, pre), pre) for b, _ in data])
    with torch.no_grad():
        fit = logistic.fit_logistic(features(normalize(x, pre)), torch.tensor([c for _, c in data]), 2, 1.0)
    classifier = Classifier(features, spec.feature_dim, 2)
    fit.load_into(classifier.head)
    return LoadedModel(classifier.eval(), ["patch", "plain"], pre, {"backbone": spec.name}), rng


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_most_of_the_heat_falls_on_the_patch_that_decides(patch_model, method):
    model, rng = patch_model
    shown = display_preprocessing(model.preprocessing)
    scale, offset = shown.resize_size / SIDE, (shown.resize_size - shown.input_size) / 2
    cell = shown.input_size / 7  # one cell of the 7x7 map: the heat of a patch spreads that far
    for _ in range(4):
        data, (y, x) = photo(rng, patch=True)
        [e] = explain_images(model, [("p.png", data)], method=method)
        assert e.label == 0 and tuple(e.cam.shape) == (7, 7)
        heat = upsampled(e.cam, e.view.shape[-1])
        top, left = (round(v * scale - offset - cell) for v in (y, x))
        bottom, right = (round((v + PATCH) * scale - offset + cell) for v in (y, x))
        near = torch.zeros_like(heat, dtype=torch.bool)
        near[max(0, top):max(0, bottom), max(0, left):max(0, right)] = True
        assert near.float().mean() < 0.35  # the patch and a cell around it: a third of the picture at most
        assert heat[near].sum() / heat.sum() > 0.6, method
        assert near.flatten()[heat.argmax()]  # the hottest point is on it


# One backbone per architecture: vit_b_16_swag and _swag_linear are vit_b_16 with other weights.
ARCHITECTURES = sorted({getattr(spec, "tv_arch", None) or name: name for name, spec in BACKBONES.items()}.values())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_backbone_is_explained_on_its_last_convolutional_stage(name, one_thread):
    spec = BACKBONES[name]
    features = spec.build_features(pretrained=False)
    pre = spec.preprocessing if name.startswith("vit") else spec.preprocessing.at_size(64)  # a ViT: its own size
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for m in stage_outputs(features, name)]
    with torch.no_grad():
        features(torch.zeros(1, 3, pre.input_size, pre.input_size))
    for h in hooks:
        h.remove()
    # the last 4-D map of a convolutional network; a ViT's patch grid (16 px patches)
    last_map = (1, 1, pre.input_size // 16, pre.input_size // 16) if name.startswith("vit") else \
        [s for s in shapes if len(s) == 4][-1]
    torch.manual_seed(0)
    classifier = Classifier(features, spec.feature_dim, 3)
    model = LoadedModel(classifier.eval(), ["a", "b", "c"], pre, {"backbone": name})
    data, _ = photo(np.random.default_rng(1), patch=True)
    [e] = explain_images(model, [("p.png", data)])
    assert tuple(e.cam.shape) == last_map[2:] and (e.cam >= 0).all()
    assert float(e.probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
    assert not any(p.grad is not None for p in classifier.parameters())  # nothing accumulated in the model


def test_a_base_heads_rows_seed_the_new_head_by_label():
    torch.manual_seed(0)
    features = torch.nn.Flatten()
    base = Classifier(features, 4, 3)
    base_model = LoadedModel(base, ["ants", "bees", "wasps"], get_backbone("efficientnet_lite0").preprocessing, {})
    start = BaseStart("m", base_model)
    new = Classifier(features, 4, 3)
    fresh = new.head.weight[1].clone()
    report = start.seed_head(new, ["bees", "platelet", "ants"])
    assert report == {"rows_kept": 2, "rows_initialized": 1}
    assert torch.equal(new.head.weight[0], base.head.weight[1]) and torch.equal(new.head.bias[2], base.head.bias[0])
    assert torch.equal(new.head.weight[1], fresh)  # the new class keeps its own initialization
    assert class_changes(["ants", "bees", "wasps"], ["bees", "platelet", "ants"]) == {
        "classes_kept": ["bees", "ants"], "classes_added": ["platelet"], "classes_removed": ["wasps"]}
    mlp = Classifier(features, 4, 3, head="mlp", hidden_dim=8)
    assert start.seed_head(mlp, ["ants"])["rows_kept"] == 0  # another kind of head: nothing to copy


def test_what_a_base_model_trained_on():
    images = [("a", "train"), ("b", "val"), ("c", None), ("d", "test")]
    assert trained_ids(images, {"b"}, None) == {"a", "c"}  # trained on train: its held-out val is not
    assert trained_ids(images, {"a", "b", "c"}, ["train", "val"]) == {"a", "b", "c"}  # refitted on all
    assert trained_ids(images, None, None) == {"a", "b", "c"}  # unknown: every non-test image counts
