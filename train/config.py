"""Stage 2's settings: one model that ``clsp-train``'s options and ``pipeline.yaml``'s ``train`` derive from.

A setting left unset (None) takes its method's recipe value (``clsp.train.methods``) for the dataset
being trained; ``TrainJob.resolved`` fills them in and refuses settings that do not apply to the method
(a method names the settings it takes). The method is any registered one, so a new method file needs no
change here unless it brings a setting of its own.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import field_validator, model_validator

from clsp.config import TF32, NumericsSettings, Precision, Settings, ValidationSettings, same_setting, setting
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.errors import UserError
from clsp.train.recipes import RECIPES, DecayScope, ForwardMode, NNIndex, Optimizer, ScheduleUnit

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet-narrow"]
_RECIPE = "[default: the method's recipe]"
MIN_LAMBDA = 1e-6  # the smallest CLSP lambda; below it the term is noise in float32 (0 is the baseline)


class TrainSettings(Settings):
    """How an encoder is trained (the ``train`` section of pipeline.yaml, and clsp-train's options)."""

    method: str = setting("simclr", "Base contrastive method: simclr, moco, nnclr or another registered one "
                                     "(SimCLR and MoCo are the paper's).", min_length=1, max_length=64)
    clsp_lambda: float | None = setting(None, f"lambda of the CLSP term; 0 trains the baseline. {_RECIPE}",
                                        ge=0, le=100)
    backbone: Backbone = setting("resnet18", "ResNet; resnet-narrow is a quarter-width ResNet-18 for CPU runs.")
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
    pred_hidden_dim: int | None = setting(None, f"NNCLR predictor hidden size. {_RECIPE}", ge=1, le=65536)
    queue_size: int | None = setting(None, f"MoCo queue per view / NNCLR support set. {_RECIPE}",
                                     ge=1, le=1 << 24)
    momentum: float | None = setting(None, f"MoCo momentum-encoder coefficient at the start. {_RECIPE}",
                                     ge=0, le=1)
    momentum_end: float | None = setting(None, f"MoCo coefficient at the end (cosine rise). {_RECIPE}",
                                         ge=0, le=1)
    nn_index: NNIndex | None = setting(None, f"NNCLR support-set search: flat (exact) or approximate. {_RECIPE}")
    crop_min_scale: float | None = setting(
        None, "Smallest crop area of RandomResizedCrop, in (0, 1]; 0.08 suits natural images, 0.5 small "
              f"digits. {_RECIPE}", gt=0, le=1)
    flip: bool | None = setting(None, f"Random horizontal flips (off for digits and text). {_RECIPE}")
    positive_choice: Literal["uniform", "top-m", "score-weighted"] = setting(
        "uniform", "Which of an anchor's k candidates is its positive each epoch: uniform (METHOD.md), uniform among "
                   "the top-m by stored score, or softmax(score / tau)-weighted (needs clsp-gen --scores).")
    positive_top_m: int = setting(2, "m of the top-m choice.", ge=1, le=64)
    positive_tau: float = setting(0.1, "Temperature of the score-weighted choice.", gt=0, le=100)
    clsp_lambda_ramp_epochs: float = setting(0.0, "Ramp lambda linearly from 0 over these epochs (0: constant), so "
                                                  "a high lambda cannot collapse an untrained encoder.",
                                             ge=0, le=100_000)
    augment: Literal["cpu", "device"] | None = setting(
        None, "cpu: per image in DataLoader workers; device: batched on the training device. "
              "[default: device on CUDA, else cpu]")
    precision: Precision = setting("auto", "auto: bf16 autocast on GPUs and on CPUs with bf16 units.")
    tf32: TF32 = same_setting(NumericsSettings, "tf32")
    workers: int = setting(min(4, len(os.sched_getaffinity(0))), "DataLoader worker processes per process (0: "
                           "in-process) [default: 4, at most the usable cores].", ge=0, le=256)
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
    positive_source: Literal["synthetic", "self", "oracle"] = setting(
        "synthetic", "What fills the CLSP positive: synthetic = the shards' positives (METHOD.md); self = an extra "
                     "augmented view of the anchor itself (the authors' simclr_aug control); oracle = a random other "
                     "training image of the same class (needs labels; the ceiling of what a positive can give).")
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
        from clsp.train.methods import registered  # imports the method files: the names are theirs

        if method not in registered():
            raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(registered())}")
        return method

    @model_validator(mode="after")
    def _ramp_fits_the_run(self) -> TrainSettings:
        """Refused here, before any work, rather than at the first training step."""
        if self.clsp_lambda != 0 and self.clsp_lambda_ramp_epochs > self.epochs:
            raise ValueError(f"clsp_lambda_ramp_epochs {self.clsp_lambda_ramp_epochs:g} is longer than the run's "
                             f"{self.epochs} epochs; ramp over at most {self.epochs} (0: no ramp) or train longer")
        return self

    @field_validator("clsp_lambda")
    @classmethod
    def _lambda_or_baseline(cls, value: float | None) -> float | None:
        """A lambda that rounds to nothing would make a "CLSP" run a second baseline."""
        if value is not None and 0 < value < MIN_LAMBDA:
            raise ValueError(f"lambda must be 0 (the baseline) or at least {MIN_LAMBDA:g}, not {value}")
        return value


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
        from clsp.train.methods import method_only_settings

        values = self.model_dump()
        for name, methods in method_only_settings().items():
            if values[name] is not None and self.method not in methods:
                raise UserError(f"--{name.replace('_', '-')} applies only to {' and '.join(methods)}, not to "
                                f"{self.method}; leave it unset")
        recipe = RECIPES[self.method].for_dataset(dataset)
        view = recipe["augmentation"]
        defaults = {**recipe, "crop_min_scale": view.crop_min_scale, "flip": view.flip}
        for name, value in values.items():
            if value is None and defaults.get(name) is not None:
                values[name] = defaults[name]
        if values["augment"] is None:
            import torch

            values["augment"] = "device" if torch.cuda.is_available() else "cpu"
        return type(self).model_validate(values)
