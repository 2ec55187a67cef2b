"""A training recipe: what a job asks for, validated once, with the defaults filled in.

The API validates requests with this model and stores the resolved recipe on the job; the worker
reads it back. Defaults depend on the strategy, so they are resolved here and nowhere else.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.backbones import BACKBONES, DEFAULT_BACKBONE

Strategy = Literal["linear_probe", "fine_tune"]
Augmentation = Literal["none", "light", "strong"]

# Per-strategy defaults: a linear probe fits a head on cached features (cheap epochs, higher
# rate); fine-tuning moves pretrained weights, so fewer epochs at a gentler rate.
STRATEGY_DEFAULTS: dict[str, dict] = {
    "linear_probe": {"epochs": 60, "learning_rate": 1e-3, "weight_decay": 1e-2},
    "fine_tune": {"epochs": 10, "learning_rate": 5e-4, "weight_decay": 5e-2},
}


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backbone: str = Field(DEFAULT_BACKBONE, description="a name from GET /v1/backbones")
    strategy: Strategy = Field("linear_probe", description="linear_probe: head on frozen features; "
                               "fine_tune: new head, whole network trained")
    epochs: int | None = Field(None, ge=1, le=500)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1)
    weight_decay: float | None = Field(None, ge=0, le=1, description="decoupled (AdamW); none on norms and biases")
    augmentation: Augmentation = Field("light", description="train-time only; fine_tune only")
    image_size: int | None = Field(None, ge=32, le=640, description="crop side in pixels; default: the backbone's")
    val_fraction: float = Field(0.2, ge=0.05, le=0.5, description="held out, stratified, when the dataset has no val split")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
        return name

    @model_validator(mode="after")
    def _fill_defaults(self) -> "TrainConfig":
        for key, value in STRATEGY_DEFAULTS[self.strategy].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.image_size is None:
            self.image_size = BACKBONES[self.backbone].preprocessing.input_size
        return self
