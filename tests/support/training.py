"""What the training tests share: a dozen real photos at 64 px, and a Control that records."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch

from tests.support.data import hymenoptera_files, subset_zip
from workers.backbones import get_backbone
from workers.preprocessing import decode_square
from workers.training import PreparedData
from workers.training.contract import NullControl

SPEC = get_backbone("efficientnet_lite0")
PRE = SPEC.preprocessing.at_size(64)


class Recorder(NullControl):
    """A training Control that never stops the run and keeps every progress update."""

    def __init__(self):
        self.updates = []

    def progress(self, update):
        self.updates.append(update)


def tiny_data(train_per_class: int = 6, val_per_class: int = 3, pre=PRE) -> PreparedData:
    def load(split, n):
        xs, ys = [], []
        for y, label in enumerate(("ants", "bees")):
            for p in hymenoptera_files(split, label)[:n]:
                xs.append(decode_square(p.read_bytes(), pre))
                ys.append(y)
        return torch.stack(xs), torch.tensor(ys)
    (tx, ty), (vx, vy) = load("train", train_per_class), load("val", val_per_class)
    return PreparedData(["ants", "bees"], pre, tx, ty, vx, vy)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def api_with_trained_probe(data_dir: Path) -> Iterator[tuple]:
    """A test client on a fresh data dir, and a linear probe (64 px, 5 epochs) that a real worker
    trained through the API on 10 + 5 photos per class: yields (settings, client, dataset, job)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.store.migrate import upgrade
    from service.settings import Settings
    from workers.worker import Worker

    settings = Settings(data_dir=data_dir, heartbeat_interval_s=1.0, poll_interval_s=0.1)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(10, 5))}).json()
        job = client.post("/v1/jobs", json={"dataset_id": dataset["id"], "strategy": "linear_probe",
                                            "image_size": 64, "epochs": 5}).json()
        thread = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
        thread.start()
        thread.join(240)
        job = client.get(f"/v1/jobs/{job['id']}").json()
        assert job["status"] == "succeeded", job
        yield settings, client, dataset, job
