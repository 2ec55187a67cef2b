"""Training as plain functions over explicit objects: data in, best classifier and metrics out.

`train` runs one recipe (or, for strategy "auto", the search in auto.py that picks one):

- linear_probe: backbone frozen; its features are computed once (`FeatureCache`) and the head is
  fitted on them. Augmentation "light" adds each training image's mirror to the cache.
- fine_tune / partial / gradual: the head and some backbone stages train on augmented images;
  `unfreeze_plan` says how many stages (counted from the output) train in each epoch, and
  `stage_param_groups` gives each stage its own rate (`lr_stage_factor`).

Every strategy honours `bn_mode` (BatchNorm running statistics frozen, batch statistics in trained
stages, or AdaBN re-estimation before training), keeps the best epoch by `monitor` (early stopping
after `patience` epochs without improvement), then fits a temperature on the val logits; the
classifier carries that temperature and `tta_flip` to the artifact and to /predict.

The epoch loops hold explicit optimizer, scheduler and torch.Generator objects (the generator
draws batches and augmentation; torch's global RNG only MixUp/CutMix coefficients), which is what
a checkpoint needs to resume an epoch exactly. On a GPU the decoded images live on the device
(`PreparedData.on`) and whole batches are augmented there (`BatchAugment`).
"""
from __future__ import annotations

import torch
from torch import nn

from workers.config import TrainConfig
from workers.device import pick_device
from workers.training.auto import train_auto
from workers.training.contract import Control, PreparedData, TrainResult
from workers.training.recipe import train_recipe

__all__ = ["Control", "PreparedData", "TrainResult", "train", "train_recipe"]


def train(config: TrainConfig, data: PreparedData, features: nn.Module, feature_dim: int,
          control: Control, device: torch.device | None = None) -> TrainResult:
    device = device or pick_device()
    data = data.on(device)
    if config.strategy == "auto":
        return train_auto(config, data, features, feature_dim, control, device)
    return train_recipe(config, data, features, feature_dim, control, device, checkpoints=True)

