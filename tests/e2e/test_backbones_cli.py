"""`graft backbones add|remove` on the server's machine, and `graft backbones list` against a running
API that sees the registration at once."""
from __future__ import annotations

import json

from service.app import create_app
from tests.e2e.test_cli import graft
from tests.support.live import uvicorn_thread
from tests.support.timm_weights import TINY_EFFICIENTNET, random_weights, write_safetensors
from workers.backbone_registry import read_registry, use_registry


def test_an_operator_registers_a_file_and_the_api_lists_it(settings, capsys, monkeypatch, tmp_path):
    data = settings.data_dir
    weights = write_safetensors(tmp_path / "eff.safetensors", random_weights(TINY_EFFICIENTNET, 1))
    env = {"GRAFT_DATA_DIR": str(data), "GRAFT_LOG_FORMAT": "text"}
    try:
        with uvicorn_thread(create_app(settings)) as url:
            code, out, err = graft(capsys, monkeypatch, "backbones", "add", "tiny-eff", "--file", str(weights),
                                   "--timm-arch", "test_efficientnet", **env)
            assert code == 0, err
            assert out.strip() == "tiny-eff" and "sha256" in err and TINY_EFFICIENTNET in err
            entry = read_registry(data / "backbones.json")["tiny-eff"]
            assert entry.file == str(weights) and entry.timm_arch == TINY_EFFICIENTNET

            code, out, _ = graft(capsys, monkeypatch, "backbones", "list", "--json", GRAFT_URL=url)
            listed = {b["name"]: b for b in json.loads(out)}
            assert code == 0 and listed["tiny-eff"]["source"] == "registered" and listed["tiny-eff"]["weights_available"]
            code, out, _ = graft(capsys, monkeypatch, "backbones", "list", GRAFT_URL=url)
            assert code == 0 and "tiny-eff" in out and "registered" in out

            code, _, err = graft(capsys, monkeypatch, "backbones", "add", "tiny-eff", "--file", str(weights),
                                 "--timm-arch", "test_efficientnet", **env)
            assert code == 2 and "already registered" in err
            code, _, err = graft(capsys, monkeypatch, "backbones", "add", "resnet18", "--file", str(weights),
                                 "--timm-arch", "test_efficientnet", **env)
            assert code == 2 and "built-in" in err

            code, _, err = graft(capsys, monkeypatch, "backbones", "remove", "tiny-eff", **env)
            assert code == 0 and "removed" in err
            code, out, _ = graft(capsys, monkeypatch, "backbones", "list", "--json", GRAFT_URL=url)
            assert "tiny-eff" not in {b["name"] for b in json.loads(out)}
    finally:
        use_registry(None)
