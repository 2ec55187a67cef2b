"""Weights for timm backbones, written by the tests themselves: real timm architectures (timm's
tiny `test_*` models, a few hundred kB) with seeded random weights, saved as safetensors into a
Hugging Face cache layout or as a file to register; and a guard that fails any network use."""
from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from workers import backbone_registry

# timm's own tiny test models, each with a pretrained config (160 px) and a Hugging Face repo.
TINY_EFFICIENTNET = "test_efficientnet.r160_in1k"
TINY_RESNET = "test_resnet.r160_in1k"
TINY_CONVNEXT = "test_convnext.r160_in1k"
TINY_VIT = "test_vit.r160_in1k"


def random_weights(arch: str, seed: int = 0, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """A state dict of timm model `arch` with its pretrained head (or `num_classes`), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(arch, pretrained=False, **kwargs)
        for p in model.parameters():  # not timm's initialisation alone (zero biases): every tensor tells
            p.data.add_(torch.randn_like(p) * 0.02)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_hf_cache(hub: Path, repo_id: str, state: dict[str, torch.Tensor], filename: str = "model.safetensors",
                   commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The file as huggingface_hub leaves it in its cache: the bytes in blobs/<sha256>, a snapshot
    symlink to them, refs/main naming the snapshot. Returns the snapshot path."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    tmp = repo / "tmp.safetensors"
    write_safetensors(tmp, state)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    blob = repo / "blobs" / digest
    blob.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(blob)
    snapshot = repo / "snapshots" / commit / filename
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home for this test: returns its hub cache."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home / "hub"


@pytest.fixture
def registry(tmp_path) -> Path:
    """This process's backbone registry, in tmp_path, for the test (and none afterwards)."""
    path = tmp_path / "backbones.json"
    backbone_registry.use_registry(path)
    yield path
    backbone_registry.use_registry(None)


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: socket connects, and the hub's download entry points."""
    import huggingface_hub
    import huggingface_hub.file_download as file_download

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:] or kwargs)[:200])
        raise NetworkUsed(f"network use: {attempts[-1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(file_download, "hf_hub_download", refuse)
    yield attempts
    assert not attempts, attempts


@pytest.fixture
def fake_hub(monkeypatch):
    """A Hugging Face Hub on loopback that huggingface_hub's own client downloads from: the files
    it serves are `hub.files[(repo_id, filename)] = bytes`; `hub.requests` records what was asked."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants as constants

    class Hub:
        files: dict[tuple[str, str], bytes] = {}
        requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            Hub.requests.append(f"{self.command} {self.path}")
            repo, sep, rest = self.path.lstrip("/").partition("/resolve/")
            data = Hub.files.get((repo, rest.partition("/")[2])) if sep else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            digest = hashlib.sha256(data).hexdigest()
            self.send_response(200)
            for header, value in (("X-Repo-Commit", "f" * 40), ("ETag", f'"{digest}"'), ("X-Linked-Etag", f'"{digest}"'),
                                  ("X-Linked-Size", str(len(data))), ("Content-Length", str(len(data)))):
                self.send_header(header, value)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    # What HF_ENDPOINT sets when huggingface_hub is imported
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    yield Hub
    server.shutdown()
    server.server_close()
