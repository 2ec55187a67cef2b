"""What the training tests share: a dozen real photos at 64 px, and a Control that records."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import hymenoptera_files
from workers.backbones import get_backbone
from workers.preprocessing import decode_square
from workers.training import PreparedData

SPEC = get_backbone("efficientnet_lite0")
PRE = SPEC.preprocessing.at_size(64)


class Recorder:
    """A training Control that never stops the run and keeps every progress update."""

    def __init__(self):
        self.updates = []

    def checkpoint(self):
        pass

    def progress(self, update):
        self.updates.append(update)


def tiny_data(train_per_class: int = 6, val_per_class: int = 3) -> PreparedData:
    def load(split, n):
        xs, ys = [], []
        for y, label in enumerate(("ants", "bees")):
            for p in hymenoptera_files(split, label)[:n]:
                xs.append(decode_square(p.read_bytes(), PRE))
                ys.append(y)
        return torch.stack(xs), torch.tensor(ys)
    (tx, ty), (vx, vy) = load("train", train_per_class), load("val", val_per_class)
    return PreparedData(["ants", "bees"], PRE, tx, ty, vx, vy)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and far faster when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
