"""Stage 2's settings: one model that ``clsp-train``'s options and ``pipeline.yaml``'s ``train`` derive from.

A setting left unset (None) takes its method's recipe value (``clsp.train.methods``) for the dataset
being trained; ``TrainJob.resolved`` fills them in and refuses settings that do not apply to the method.
The method is any registered one, and the settings only some methods take are declared by those methods
(``clsp.train.methods.base.own``) and added here, so a new method file needs no change here.

``precision`` and ``augment`` default to ``auto``: a rule the run applies on its machine. A run's identity
(its fingerprint) holds ``auto``, the same on every machine; what the rule gave is recorded with the run and
checked on resume (``clsp.train.trainer.run_settings``), like the process count.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from pydantic import create_model, field_validator, model_validator

from clsp.config import (
    PRECISION_HELP,
    TF32,
    NumericsSettings,
    Precision,
    Settings,
    ValidationSettings,
    same_setting,
    setting,
)
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.errors import UserError
from clsp.train.backbones import Backbone, Stem
from clsp.train.methods import method_only_settings, own_defaults, own_fields, own_settings, registered
from clsp.train.methods.base import REGISTRY
from clsp.train.positive_sources import PositiveSource
from clsp.train.recipes import RECIPES, DecayScope, ForwardMode, Optimizer, PositiveLoss, ScheduleUnit

Augment = Literal["auto", "cpu", "device"]
_RECIPE = "[default: the method's recipe]"
MIN_LAMBDA = 1e-6  # the smallest CLSP lambda; below it the term is noise in float32 (0 is the baseline)


class TrainSettings(Settings):
    """How an encoder is trained (the ``train`` section of pipeline.yaml, and clsp-train's options)."""

    method: str = setting("simclr", f"Base contrastive method: {', '.join(registered())} or another registered "
                                     "one.", min_length=1, max_length=64)
    clsp_lambda: float | None = setting(None, f"lambda of the CLSP term; 0 trains the baseline. {_RECIPE}",
                                        clsp_only=True, ge=0, le=100)
    backbone: Backbone = setting("resnet18", "ResNet; resnet-narrow is a quarter-width ResNet-18 for CPU runs.")
    stem: Stem | None = setting(None, "ResNet stem: small = 3x3 stride-1 conv, no max-pool (CIFAR); mid = the same "
                                      "conv, max-pool kept (the authors' STL-10); imagenet = 7x7 stride-2 conv and "
                                      "max-pool. [default: small up to 64-pixel images, else imagenet]")
    epochs: int = setting(1000, "Training epochs.", ge=1, le=100_000)
    batch_size: int | None = setting(None, f"Global batch over all processes (must divide by them). {_RECIPE}",
                                     ge=1, le=1 << 20)
    lr: float | None = setting(None, f"Peak learning rate after warm-up. {_RECIPE}", gt=0, le=100)
    optimizer: Optimizer | None = setting(None, f"SGD (momentum 0.9) or LARS. {_RECIPE}")
    weight_decay: float | None = setting(None, f"Weight decay. {_RECIPE}", ge=0, le=1)
    weight_decay_scope: DecayScope | None = setting(
        None, f"all: every parameter is decayed; weights: biases and norm parameters are not. {_RECIPE}")
    warmup_epochs: float | None = setting(None, f"Linear warm-up from --warmup-start-lr, then cosine to 0. {_RECIPE}",
                                          ge=0, le=100_000)
    temperature: float | None = setting(None, f"Softmax temperature of the contrastive loss. {_RECIPE}",
                                        gt=0, le=100)
    proj_hidden_dim: int | None = setting(None, f"Projector hidden size. {_RECIPE}", ge=1, le=65536)
    proj_output_dim: int | None = setting(None, f"Projector output size. {_RECIPE}", ge=1, le=65536)
    crop_min_scale: float | None = setting(
        None, "Smallest crop area of RandomResizedCrop, in (0, 1]; 0.08 suits natural images, 0.5 small "
              f"digits. {_RECIPE}", gt=0, le=1)
    flip: bool | None = setting(None, f"Random horizontal flips (off for digits and text). {_RECIPE}")
    positive_choice: Literal["uniform", "top-m", "score-weighted"] = setting(
        "uniform", "Which of an anchor's k candidates is its positive each epoch: uniform (METHOD.md), uniform among "
                   "the top-m by stored score, or softmax(score / tau)-weighted (needs clsp-gen --scores).",
        clsp_only=True)
    positive_loss: PositiveLoss | None = setting(
        None, "How the synthetic positive enters the loss: align = lambda * ||z1 - z3||^2 (the authors' term); "
              "infonce = the positive as a second positive of both real views inside the method's own contrastive "
              "loss, against the same negatives; nn = (NNCLR) the positive's nearest neighbour in the support set "
              f"as a positive of both views' predictions. {_RECIPE}", clsp_only=True)
    positive_top_m: int = setting(2, "m of the top-m choice.", clsp_only=True, ge=1, le=64)
    positive_tau: float = setting(0.1, "Temperature of the score-weighted choice.", clsp_only=True, gt=0, le=100)
    clsp_lambda_ramp_epochs: float = setting(0.0, "Ramp lambda linearly from 0 over these epochs (0: constant), so "
                                                  "a high lambda cannot collapse an untrained encoder.",
                                             clsp_only=True, ge=0, le=100_000)
    augment: Augment = setting(
        "auto", "cpu: per image in DataLoader workers; device: batched on the training device; auto: device on "
                "CUDA, else cpu.")
    precision: Precision = setting("auto", PRECISION_HELP)
    tf32: TF32 = same_setting(NumericsSettings, "tf32")
    workers: int = setting(help="DataLoader worker processes per process (0: in-process); the batches are the "
                                "same for any number [default: 4, at most the usable cores].", role="speed",
                           default_factory=lambda: min(4, len(os.sched_getaffinity(0))), ge=0, le=256)
    decoded_cache_dir: str | None = setting(
        None, "Keep the decoded positives here as memory-mapped files, shared by workers, ranks and later "
              "runs [default: in memory, for this run].", role="location", min_length=1, max_length=4096)
    sync_bn: bool = setting(False, "Synchronise BatchNorm statistics across processes.")
    compile: bool = setting(False, "torch.compile the backbone.", role="speed")
    checkpoint_every: int = setting(10, "Checkpoint every N epochs (and at the end).", role="logging",
                                    ge=1, le=100_000)
    checkpoint_steps: int = setting(0, "Also checkpoint every N steps within an epoch (0: never).", role="logging",
                                    ge=0)
    log_every: int = setting(10, "Steps between logged scalars.", role="logging", ge=1, le=100_000)
    stop_on_collapse: bool = setting(False, "Stop with an error (no encoder written) when an epoch sits at "
                                            "collapse, instead of warning and training on.", role="logging")
    positive_source: PositiveSource = setting(
        "synthetic", "What fills the CLSP positive: synthetic = the shards' positives (METHOD.md); self = an extra "
                     "augmented view of the anchor itself (the authors' simclr_aug control); oracle = a random other "
                     "training image of the same class (needs labels; the ceiling of what a positive can give).",
        clsp_only=True)
    forward: ForwardMode | None = setting(
        None, "joint: one backbone call on the concatenated views, whose BatchNorm statistics it keeps; separate: "
              "one call per view, the synthetic one leaving BatchNorm's running statistics untouched. "
              f"{_RECIPE}")
    schedule_unit: ScheduleUnit | None = setting(
        None, f"Move the warm-up and cosine schedule once per epoch (peak at the last warm-up epoch) or per step. "
              f"{_RECIPE}")
    warmup_start_lr: float | None = setting(None, f"Learning rate of the first warm-up epoch or step. {_RECIPE}",
                                            gt=0, le=100)

    @field_validator("method")
    @classmethod
    def _registered(cls, method: str) -> str:
        if method not in registered():
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(registered())}")
        missing = [name for name in own_settings(REGISTRY[method]) if name not in cls.model_fields]
        if missing:
            raise ValueError(f"method {method!r} brings the settings {', '.join(missing)}, made only for the methods "
                             "registered before clsp.train.config is imported: put its file in clsp/train/methods")
        return method

    @model_validator(mode="after")
    def _schedules_fit_the_run(self) -> TrainSettings:
        """One rule for every schedule (the learning rate's warm-up, the lambda ramp): one longer than the run is
        refused here, before any work, rather than cut short silently. A recipe's warm-up is cut to the run by
        ``TrainJob.resolved``: it is a default, not a request."""
        ramp = self.clsp_lambda_ramp_epochs if self.clsp_lambda != 0 else None
        for name, epochs in (("warmup_epochs", self.warmup_epochs), ("clsp_lambda_ramp_epochs", ramp)):
            if epochs is not None and epochs > self.epochs:
                raise ValueError(f"{name} {epochs:g} is longer than the run's {self.epochs} epochs; use at most "
                                 f"{self.epochs} (0: none) or train longer")
        return self

    @field_validator("batch_size")
    @classmethod
    def _two_per_batch(cls, value: int | None) -> int | None:
        """A contrastive loss compares each sample with the others of its batch: one sample has none (the loss is
        0, the collapse monitor's std NaN). The per-process share is checked where the process count is known."""
        if value is not None and value < 2:
            raise ValueError(f"a contrastive batch needs at least 2 samples per process, not {value}")
        return value

    @field_validator("workers")
    @classmethod
    def _usable_cores(cls, value: int) -> int:
        """More DataLoader workers than cores only contend for them (and each holds its own copy of the data)."""
        cores = len(os.sched_getaffinity(0))
        if value > cores:
            raise ValueError(f"{value} workers exceed the {cores} usable CPU cores; use at most {cores} "
                             f"(0: in-process)")
        return value

    @field_validator("clsp_lambda")
    @classmethod
    def _lambda_or_baseline(cls, value: float | None) -> float | None:
        """A lambda that rounds to nothing would make a "CLSP" run a second baseline."""
        if value is not None and 0 < value < MIN_LAMBDA:
            raise ValueError(f"lambda must be 0 (the baseline) or at least {MIN_LAMBDA:g}, not {value}")
        return value


if not TYPE_CHECKING:  # the settings only some methods take, as the methods declare them
    TrainSettings = create_model("TrainSettings", __base__=TrainSettings, __module__=__name__,
                                 __doc__=TrainSettings.__doc__, **own_fields())


class TrainJob(TrainSettings):
    """One training run: the settings plus where it reads and writes."""

    shards: str = setting(..., "Shard directory or URL from clsp-gen (s3://, gs://, http(s)://; "
                                 "simplecache::URL keeps a local copy).", role="location")
    out: str = setting(..., "Run directory: checkpoint, encoder, TensorBoard logs. A rerun resumes from it.",
                       role="location")
    data_root: str = setting(DEFAULT_DATA_ROOT, "Where the real dataset lives (env CLSP_DATA_ROOT).",
                             role="location")
    seed: int = setting(0, "Seed of the weights, the epoch order and every augmentation.", ge=0, le=2**63 - 1)
    allow_partial: bool = setting(False, "Train on the anchors whose shards are finished when some are missing.")
    validation: float = same_setting(ValidationSettings, "validation")

    def resolved(self, dataset: str) -> TrainJob:
        """A copy with every unset setting taken from the method's recipe for ``dataset``."""
        values = self.model_dump()
        for name, methods in method_only_settings().items():
            if values[name] is not None and self.method not in methods:
                raise UserError(f"--{name.replace('_', '-')} applies only to {' and '.join(methods)}, not to "
                                f"{self.method}; leave it unset")
        implemented = REGISTRY[self.method].positive_losses
        if self.positive_loss is not None and self.positive_loss not in implemented:
            raise UserError(f"--positive-loss {self.positive_loss} is not implemented by {self.method}; choose one "
                            f"of: {', '.join(implemented)}")
        recipe = {**own_defaults(self.method), **RECIPES[self.method].for_dataset(dataset)}
        view = recipe["augmentation"]
        defaults = {**recipe, "crop_min_scale": view.crop_min_scale, "flip": view.flip,
                    "warmup_epochs": min(recipe["warmup_epochs"], self.epochs)}
        for name, value in values.items():
            if value is None and defaults.get(name) is not None:
                values[name] = defaults[name]
        return type(self).model_validate(values)
