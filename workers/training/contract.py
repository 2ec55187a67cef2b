"""What a training run takes and gives back: the control it answers to, its data, its result."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from workers.artifacts import Classifier
from workers.backbones import Preprocessing


class Control(Protocol):
    """What a training loop needs from whoever runs it (the worker's lease, a benchmark, a test)."""

    def stop_if_asked(self) -> None:
        """Called between steps; raises to stop (cancelled, lease lost, shutting down)."""

    def progress(self, update: dict) -> None:
        """The job's live progress, in the one shape of workers/progress.py (phase, unit, done,
        total, and the phase's own fields); loops report through its PhaseMeter."""

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
    # The images' ids (blob sha256s) in the order of each split's rows (None: data made another way):
    # a model's held-out predictions name the images they are of.
    train_ids: list[str] | None = None
    val_ids: list[str] | None = None
    test_ids: list[str] | None = None
    # The same images, labels and splits decoded for another backbone (by name), and that
    # backbone's pristine features: what lets auto choose the backbone. Given by the worker;
    # None where the images cannot be decoded again (auto then keeps this backbone).
    at_backbone: Callable[[str], tuple[PreparedData, nn.Module]] | None = field(default=None, repr=False)
    # Issue 16: the dataset's unlabeled images (uint8 squares, their sha256s), when the job may learn
    # from them; never in a split, never scored (workers/training/semi.py).
    unlabeled_x: torch.Tensor | None = field(default=None, repr=False)
    unlabeled_ids: list[str] | None = None
    # Issue 17: each image has any of the classes; train_y, val_y, test_y are float [N, classes] of
    # 0/1 (workers/training/multilabel.py), not class indices.
    multi_label: bool = False

    def on(self, device: torch.device, share_of_free: float = 0.25) -> PreparedData:
        """The images moved to a GPU when they take at most `share_of_free` of its free memory, so
        batches are gathered and augmented there; otherwise (and on CPUs) unchanged. Labels stay
        on the host: samplers draw from them with a CPU generator."""
        if device.type != "cuda" or self.train_x.device == device:
            return self
        free, _ = torch.cuda.mem_get_info(device)
        if self.train_x.nbytes + self.val_x.nbytes > share_of_free * free:
            return self  # streamed: each batch is gathered on the host (from the memory map) and sent
        if (both := self._adjacent()) is None:
            return dataclasses.replace(self, train_x=self.train_x.to(device), val_x=self.val_x.to(device))
        both = both.to(device)  # one copy, still adjacent there
        return dataclasses.replace(self, train_x=both[:len(self.train_x)], val_x=both[len(self.train_x):])

    def labeled_x(self) -> torch.Tensor:
        """train_x then val_x as one tensor: a view when they lie next to each other in memory (as
        workers.data lays them out, in one memory map), else a copy."""
        both = self._adjacent()
        return both if both is not None else torch.cat([self.train_x, self.val_x])

    def _adjacent(self) -> torch.Tensor | None:
        a, b = self.train_x, self.val_x
        if (a.device == b.device and a.dtype == b.dtype and a.shape[1:] == b.shape[1:] and a.is_contiguous()
                and b.is_contiguous() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.storage_offset() == a.storage_offset() + a.numel()):
            return a.as_strided((len(a) + len(b), *a.shape[1:]), a.stride())
        return None


@dataclass
class HeldOut:
    """Out-of-sample logits of the finished model's recipe: each image predicted by a model that did
    not train on it (val, or out of fold), uncalibrated and mirror-averaged as the model serves."""

    logits: torch.Tensor  # [N, classes] float32, host
    y: torch.Tensor  # [N] true labels
    rows: torch.Tensor  # [N] positions in the pooled images: train, then val (PreparedData order)
    predictions: str  # "val" or "out of fold"
    # Issue 17: the head's input features of every pooled image (train, then val; [N_pooled, D],
    # mirror-averaged when the model averages mirrors), when its backbone is the frozen one they
    # were computed with (heads on frozen features); None otherwise. The OOD score is fitted on them.
    features: torch.Tensor | None = None
    # Issue 17, a tuned backbone (auto's fine_tune_top): `features` are then the final model's, and
    # these are the "cosine" scores [len(rows)] of the held-out rows, each computed by the fold's
    # model that never trained on it (its own features and class means).
    feature_scores: torch.Tensor | None = None


@dataclass
class TrainResult:
    classifier: Classifier
    metrics: dict
    history: list[dict] = field(default_factory=list)
    recipe: dict | None = None  # the resolved recipe that trained this model (auto: the one it chose)
    # The preprocessing the classifier expects, when it is not the data's (auto chose another backbone).
    preprocessing: Preprocessing | None = None
    held_out: HeldOut | None = None  # what the model's val metrics were computed from
    test_probabilities: torch.Tensor | None = None  # [N_test, classes] as /predict answers (the test split)

