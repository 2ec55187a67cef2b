"""A training recipe: what a job asks for, validated once, with the defaults filled in.

The API validates requests with this model and stores the resolved recipe on the job; the worker
reads it back. Defaults depend on the strategy, so they are resolved here and nowhere else.

`strategy="auto"` (the default) leaves the searchable fields (`learning_rate`, `weight_decay`,
`head`, `tta_flip`, ...) as None: None means "auto chooses" (see workers/training/auto.py). Fields the
user sets are kept fixed by the search. Every other strategy gets its defaults filled in here,
so a stored job config is always complete and re-validates to the same recipe.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from workers.backbones import AUTO_BACKBONES, BACKBONES, DEFAULT_BACKBONE

Strategy = Literal["auto", "linear_probe", "fine_tune", "partial", "gradual", "fine_tune_top"]
Augmentation = Literal["none", "light", "strong"]
BnMode = Literal["frozen", "train", "adabn"]
Head = Literal["linear", "mlp"]
Solver = Literal["adamw", "lbfgs"]
Schedule = Literal["cosine", "one_cycle", "constant"]
Monitor = Literal["val_accuracy", "val_loss"]
ClassWeighting = Literal["none", "balanced"]
Sampler = Literal["shuffle", "balanced"]
Unlabeled = Literal["ignore", "pseudo_label"]

# Per-strategy defaults: a linear probe fits a head on cached features (cheap epochs, higher
# rate); fine-tuning moves pretrained weights, so fewer epochs at a gentler rate, and the
# stages nearer the input (generic features) at a lower rate than those nearer the head.
STRATEGY_DEFAULTS: dict[str, dict] = {
    "linear_probe": {"epochs": 60, "learning_rate": 1e-3, "weight_decay": 1e-2, "augmentation": "none",
                     "lr_stage_factor": 1.0, "solver": "adamw"},
    "fine_tune": {"epochs": 10, "learning_rate": 5e-4, "weight_decay": 5e-2, "augmentation": "light",
                  "lr_stage_factor": 1.0},
    "partial": {"epochs": 10, "learning_rate": 1e-3, "weight_decay": 5e-2, "augmentation": "light",
                "lr_stage_factor": 1.0, "unfreeze_stages": 2},
    "gradual": {"epochs": 10, "learning_rate": 5e-4, "weight_decay": 5e-2, "augmentation": "light",
                "lr_stage_factor": 0.7},
    # The top on cached activations (workers/training/top.py): the recipe measured on bloodcells
    # (docs/benchmarks.md); "light" is each image or its mirror, at random, per epoch.
    "fine_tune_top": {"epochs": 12, "learning_rate": 1e-3, "weight_decay": 5e-2, "augmentation": "light",
                      "lr_stage_factor": 1.0, "unfreeze_stages": 2, "label_smoothing": 0.1, "batch_size": 64,
                      "schedule": "one_cycle"},
}
# Defaults shared by every explicit strategy (auto leaves them None for its search to pick); a
# strategy's own default of the same field wins. A default fills a field the user did not give.
COMMON_DEFAULTS: dict = {"head": "linear", "tta_flip": False, "label_smoothing": 0.0, "dropout": 0.0}
HIDDEN_DIM_DEFAULT = 512
LOGISTIC_C_DEFAULT = 1.0
MIX_PROB_DEFAULT = 0.5


class TrainConfig(BaseModel):
    # The per-strategy defaults travel in the schema (and so in /openapi.json): the CLI's help and
    # the dashboard's form show them without a copy of their own.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"x-strategy-defaults": STRATEGY_DEFAULTS,
                                                                 "x-common-defaults": COMMON_DEFAULTS})

    backbone: str | None = Field(None, description=(
        f"a name from GET /v1/backbones; default {DEFAULT_BACKBONE}, except that strategy auto then "
        f"chooses among {', '.join(AUTO_BACKBONES)} by cross-validation as its budget allows"))
    base_model_id: str | None = Field(None, min_length=1, max_length=64, description=(
        "train on from this model of the project (or the job that trained it): its weights are the start "
        "(same backbone; backbone and image_size default to its), its head's rows are kept for the classes "
        "the dataset still has, and the new model's metrics compare it with this one (metrics.base_model)"))
    strategy: Strategy = Field("auto", description=(
        "auto: a short search on the val split picks the recipe (see README); linear_probe: head on "
        "frozen, cached features; fine_tune: whole network; partial: the last unfreeze_stages stages; "
        "gradual: head first, then one more stage per epoch; fine_tune_top: the last unfreeze_stages "
        "stages trained on their cached inputs (minutes on a CPU; no pixel augmentation)"))
    time_budget_s: float | None = Field(None, ge=10, le=86400, description="auto only: seconds the search may spend")
    epochs: int | None = Field(None, ge=1, le=500)
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float | None = Field(None, gt=0, le=1, description="the head's rate (peak, after warm-up)")
    lr_stage_factor: float | None = Field(None, gt=0, le=1, description=(
        "discriminative rates: each backbone stage trains at this factor times the rate of the stage "
        "after it (the last stage at learning_rate x factor); 1 = one rate"))
    unfreeze_stages: int | None = Field(None, ge=1, le=64, description=(
        "partial, fine_tune_top: stages trained, counted from the output; gradual: stop unfreezing after "
        "this many (default all); more than the backbone has means all"))
    bn_mode: BnMode = Field("frozen", description=(
        "frozen: BatchNorm running statistics fixed; train: batch statistics in trained stages; "
        "adabn: statistics re-estimated on the training images before training, then frozen"))
    weight_decay: float | None = Field(None, ge=0, le=1, description="decoupled (AdamW); none on norms and biases")
    l2sp: float = Field(0.0, ge=0, le=10, description=(
        "L2-SP: penalty l2sp/2 * |w - w_pretrained|^2 on backbone weights, which then get no weight_decay"))
    label_smoothing: float | None = Field(None, ge=0, le=0.5)
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout on the head's inputs (and hidden units)")
    head: Head | None = Field(None, description="linear, or mlp (one hidden ReLU layer of hidden_dim units)")
    hidden_dim: int | None = Field(None, ge=8, le=8192, description="mlp head only")
    solver: Solver | None = Field(None, description=(
        "linear_probe only: adamw (mini-batch epochs, the best epoch on val kept) or lbfgs (full-batch "
        "multinomial logistic regression on standardized features, L2 strength 1/logistic_c; deterministic, "
        "no epochs or learning rate)"))
    logistic_c: float | None = Field(None, gt=0, le=1e6, description=(
        "solver lbfgs: inverse L2 strength (scikit-learn's C); larger regularizes less. Default 1"))
    unlabeled: Unlabeled | None = Field(None, description=(
        "the dataset's unlabeled images (issue 16), strategy auto only: ignore; pseudo_label: self-training "
        "on the frozen features (the model labels them, the confident ones, class-balanced, train with a weight, "
        "for a few rounds; never validated on); default: auto tries pseudo_label as one more candidate and "
        "keeps it when cross-validation says it helps"))
    refit: bool | None = Field(None, description=(
        "auto, when the dataset has a val split you gave: false (default) trains the chosen recipe on train "
        "only, so val stays a held-out score; true trains it on train + val after choosing. Without a val "
        "split auto cross-validates and always trains on every labeled image"))
    feature_l1: float = Field(0.0, ge=0, le=10, description=(
        "L1 penalty on the representation the final layer reads (mlp hidden units, or backbone features "
        "when the backbone trains): mean |activation| times this"))
    augmentation: Augmentation | None = Field(None, description=(
        "train-time only: none; light = random resized crop + flip; strong = light + brightness, contrast "
        "and saturation jitter + random erasing (whole batches at once, on the GPU when there is one). "
        "A linear probe supports none or light (its flip view)"))
    mixup_alpha: float = Field(0.0, ge=0, le=10, description="MixUp Beta(alpha, alpha); 0 = off")
    cutmix_alpha: float = Field(0.0, ge=0, le=10, description="CutMix Beta(alpha, alpha); 0 = off; needs pixels, "
                                "so not with linear_probe")
    mix_prob: float | None = Field(None, ge=0, le=1, description="share of batches mixed when mixup/cutmix is on")
    tta_flip: bool | None = Field(None, description="average the logits of each image and its mirror at evaluation "
                                  "and predict")
    schedule: Schedule = Field("cosine", description="cosine: linear warm-up then cosine decay; one_cycle; constant")
    warmup_fraction: float = Field(0.1, ge=0, le=0.5, description="share of steps in warm-up (cosine, one_cycle)")
    patience: int | None = Field(None, ge=1, le=500, description="early stopping: epochs without improvement")
    monitor: Monitor = Field("val_accuracy", description="what picks the best epoch and drives early stopping")
    class_weighting: ClassWeighting = Field("none", description="balanced: loss weights inversely "
                                            "proportional to class frequency")
    sampler: Sampler = Field("shuffle", description="balanced: draw each class equally often")
    target_precision: float | None = Field(None, gt=0, le=1, description=(
        "multi-label datasets: each label's threshold is the lowest whose held-out precision reaches this "
        "(the most recall at that precision); default: the threshold of best held-out F1"))
    image_size: int | None = Field(None, ge=32, le=640, description="crop side in pixels; default: the backbone's")
    val_fraction: float = Field(0.2, ge=0.05, le=0.5, description="held out, stratified, when the dataset has no val split")
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str | None) -> str | None:
        if name is not None and name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
        return name

    @model_validator(mode="after")
    def _check_and_fill(self) -> "TrainConfig":
        if self.backbone is None and self.strategy != "auto":
            self.backbone = DEFAULT_BACKBONE
        _check_combinations(self)
        if self.image_size is None and self.backbone is not None:
            self.image_size = BACKBONES[self.backbone].preprocessing.input_size
        if self.strategy == "auto":
            return self  # None fields are for the search to choose
        for key, value in {**COMMON_DEFAULTS, **STRATEGY_DEFAULTS[self.strategy]}.items():
            if getattr(self, key, None) is None or key not in self.model_fields_set:
                setattr(self, key, value)
        if self.head == "mlp" and self.hidden_dim is None:
            self.hidden_dim = HIDDEN_DIM_DEFAULT
        if self.solver == "lbfgs" and self.logistic_c is None:
            self.logistic_c = LOGISTIC_C_DEFAULT
        if (self.mixup_alpha or self.cutmix_alpha) and self.mix_prob is None:
            self.mix_prob = MIX_PROB_DEFAULT
        return self


def _check_combinations(c: TrainConfig) -> None:
    """Reject recipes whose options contradict each other, saying what is allowed instead."""
    s = c.strategy
    if c.backbone is not None and c.image_size is not None:
        BACKBONES[c.backbone].check_input_size(c.image_size)  # a ViT's position embeddings have one size
    if c.unlabeled == "pseudo_label" and s != "auto":
        raise ValueError(f"unlabeled 'pseudo_label' applies to strategy 'auto' only, not {s!r}: it self-trains "
                         "auto's logistic heads on the frozen features")
    if c.time_budget_s is not None and s != "auto":
        raise ValueError(f"time_budget_s applies to strategy 'auto' only, not {s!r}")
    if c.unfreeze_stages is not None and s not in ("partial", "gradual", "fine_tune_top", "auto"):
        raise ValueError(f"unfreeze_stages applies to strategies 'partial', 'gradual' and 'fine_tune_top', "
                         f"not {s!r}")
    if c.hidden_dim is not None and c.head == "linear":
        raise ValueError("hidden_dim applies to head 'mlp' only")
    if c.refit is not None and s != "auto":
        raise ValueError(f"refit applies to strategy 'auto' only, not {s!r}")
    if c.solver is not None and s not in ("linear_probe", "auto"):
        raise ValueError(f"solver applies to strategy 'linear_probe' only, not {s!r}")
    if c.logistic_c is not None and c.solver not in ("lbfgs", None):
        raise ValueError("logistic_c applies to solver 'lbfgs' only")
    if c.solver == "lbfgs":
        _check_lbfgs(c)
    if c.mix_prob is not None and not (c.mixup_alpha or c.cutmix_alpha):
        raise ValueError("mix_prob needs mixup_alpha or cutmix_alpha above 0")
    if c.class_weighting == "balanced" and c.sampler == "balanced":
        raise ValueError("class_weighting 'balanced' and sampler 'balanced' correct the same imbalance "
                         "twice; choose one")
    if s == "linear_probe":
        if c.bn_mode == "train":
            raise ValueError("bn_mode 'train' needs trained backbone stages; a linear_probe's backbone is "
                             "frozen: use 'frozen' or 'adabn'")
        if c.l2sp:
            raise ValueError("l2sp pulls trained backbone weights toward the pretrained ones; a linear_probe "
                             "trains none: use weight_decay, or strategy fine_tune/partial/gradual")
        _refuse_pixel_options(c, "a linear_probe", "features", "adds each training image's mirror",
                              "a fine-tuning strategy")
        if c.lr_stage_factor not in (None, 1.0):
            raise ValueError("lr_stage_factor applies to strategies that train the backbone")
        if c.feature_l1 and c.head != "mlp":
            raise ValueError("feature_l1 on a linear_probe needs head 'mlp' (the fixed features have "
                             "nothing to sparsify)")
    if s == "fine_tune_top":
        _check_top(c)


def _check_top(c: TrainConfig) -> None:
    """fine_tune_top trains on activations cached once per image and its mirror: no pixels to augment."""
    from workers.training.top import supports_top_tuning  # the training package imports this module

    if not supports_top_tuning(BACKBONES[c.backbone]):
        supported = ", ".join(sorted(n for n, spec in BACKBONES.items() if supports_top_tuning(spec)))
        raise ValueError(f"fine_tune_top needs a backbone whose forward splits between stages ({supported}), "
                         f"not {c.backbone!r}: use strategy 'partial' for it")
    _refuse_pixel_options(c, "fine_tune_top", "activations", "each image or its mirror", "strategy 'partial'")


def _refuse_pixel_options(c: TrainConfig, who: str, cached: str, light: str, instead: str) -> None:
    """A strategy that trains on cached tensors has no pixels to cut and mix or to jitter."""
    if c.cutmix_alpha:
        raise ValueError(f"cutmix mixes pixels, but {who} trains on cached {cached}: use mixup_alpha (it mixes "
                         f"the {cached}), or {instead}")
    if c.augmentation == "strong":
        raise ValueError(f"{who} trains on cached {cached}: augmentation 'none' or 'light' ({light}); 'strong' "
                         f"needs {instead}")


def _check_lbfgs(c: TrainConfig) -> None:
    """Logistic regression fits a linear head on fixed features by one full-batch loss."""
    if c.head == "mlp":
        raise ValueError("solver 'lbfgs' fits a linear head: use head 'linear', or solver 'adamw' for 'mlp'")
    unsupported = {"mixup_alpha": c.mixup_alpha, "label_smoothing": c.label_smoothing, "feature_l1": c.feature_l1,
                   "dropout": c.dropout}
    for name, value in unsupported.items():
        if value:
            raise ValueError(f"solver 'lbfgs' (logistic regression) has no {name}: leave it at 0, or use "
                             "solver 'adamw'")
    if c.sampler == "balanced":
        raise ValueError("solver 'lbfgs' uses every image in each step: correct imbalance with class_weighting "
                         "'balanced' instead of sampler 'balanced'")
