"""What a training run takes and gives back: the control it answers to, its data, its result."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.artifacts import Classifier
from workers.backbones import Preprocessing


class Control(Protocol):
    """What a training loop needs from whoever runs it (the worker's lease, a benchmark, a test)."""

    def stop_if_asked(self) -> None:
        """Called between steps; raises to stop (cancelled, lease lost, shutting down)."""

    def progress(self, update: dict) -> None:
        """The job's live progress: phase, epoch, step, scores."""

    def save_checkpoint(self, epoch: int, state: dict) -> None:
        """Keep an epoch's end (`parts.training_state`) so a retried job resumes after it; may do nothing."""

    def resume_state(self) -> dict | None:
        """The last saved epoch's state for this job, or None to start from the beginning."""


class NullControl:
    """A Control that never stops, reports nothing and keeps no checkpoints (benchmarks, tests)."""

    def stop_if_asked(self) -> None:
        pass

    def progress(self, update: dict) -> None:
        pass

    def save_checkpoint(self, epoch: int, state: dict) -> None:
        pass

    def resume_state(self) -> dict | None:
        return None


@dataclass
class PreparedData:
    """Decoded images as uint8 squares at the preprocessing's resize size, and their labels."""

    classes: list[str]
    preprocessing: Preprocessing
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    # What these pixels and this train/val split are (workers.data: the images' sha256s, decoding
    # and split); None for data made another way. Features are reused across jobs only with one.
    source_key: str | None = None
    # True when the user gave the val split; False when Graft held it out of the labeled images,
    # so a search may cross-validate over train + val and refit on all of them.
    val_given: bool = True
    # The user's test split: never trained or selected on, scored apart (None: there is none).
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None

    def on(self, device: torch.device, share_of_free: float = 0.25) -> PreparedData:
        """The images moved to a GPU when they take at most `share_of_free` of its free memory, so
        batches are gathered and augmented there; otherwise (and on CPUs) unchanged. Labels stay
        on the host: samplers draw from them with a CPU generator."""
        if device.type != "cuda" or self.train_x.device == device:
            return self
        free, _ = torch.cuda.mem_get_info(device)
        if self.train_x.nbytes + self.val_x.nbytes > share_of_free * free:
            return self
        return dataclasses.replace(self, train_x=self.train_x.to(device), val_x=self.val_x.to(device))


@dataclass
class TrainResult:
    classifier: Classifier
    metrics: dict
    history: list[dict] = field(default_factory=list)
    recipe: dict | None = None  # the resolved recipe that trained this model (auto: the one it chose)

