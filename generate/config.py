"""Stage 1's settings: generation (``clsp-gen``) and DDPM training (``clsp ddpm train``).

Each is one model; the commands' options and pipeline.yaml's ``generate`` and ``diffusion`` sections
derive from them. Defaults are METHOD.md's (k 8, w 0.1, 100 DDIM steps, eta 0.1).
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from clsp.config import (
    DATASET_HELP,
    PRECISION_HELP,
    TF32,
    DatasetConfig,
    NumericsSettings,
    Precision,
    Settings,
    same_setting,
    setting,
)

DDPMPreset = Literal["auto", "ddpm-cifar", "digits", "tiny"]
AUTHORS_LABEL_DROPOUT = 0.1  # their conditional training's share of steps trained as the null class
DEVICE = r"^(cpu|cuda(:\d{1,2})?|mps|xpu(:\d{1,2})?)$"  # torch device names this project runs on


class GenerateSettings(Settings):
    """How positives are drawn (pipeline.yaml's ``generate`` section)."""

    candidates: int = setting(8, "Synthetic positives (k) per anchor.", ge=1, le=64)
    interpolation: float = setting(0.1, "Interpolation weight w: 1 = plain sampling, 0 = the anchor's bottleneck "
                                        "only.", ge=0, le=1)
    mix_depth: int = setting(0, "Also mix the d deepest skip connections (0: the bottleneck only, METHOD.md; 1-2 "
                                "keep the anchor's class more often, deeper ones break the samples).", ge=0, le=64)
    scores: bool = setting(True, "Store each candidate's agreement with its anchor (bottleneck cosine at t=100), "
                                 "for training's top-m and score-weighted positive choice.")
    guidance: float | None = setting(
        None, "Classifier-free guidance weight W of a class-conditional model: each anchor's positives are drawn for "
              "its label with eps = (1 + W) eps(x, t, y) - W eps(x, t, null); 0 = the conditional prediction alone, "
              "the authors use 1.8 with --interpolation 1 --steps 100 --eta 1. Needed for such a model, refused for "
              "an unconditional one.", ge=0, le=100)
    steps: int = setting(100, "DDIM steps (at most the model's training timesteps).", ge=1, le=1000)
    eta: float = setting(0.1, "DDIM stochasticity (0 = deterministic).", ge=0, le=1)
    batch_size: int = setting(64, "Anchors per sampler call (each brings k candidates).", role="speed",
                              ge=1, le=65536)
    shard_size: int = setting(1000, "Anchors per shard.", ge=1, le=1_000_000)
    precision: Precision = setting("auto", PRECISION_HELP)
    tf32: TF32 = same_setting(NumericsSettings, "tf32")
    share_anchor_pass: bool = setting(False, "Share the anchor's encoder pass (and noise) among its k candidates: "
                                             "cheaper.")
    compile: bool = setting(False, "torch.compile the U-Net blocks (compiling takes minutes: for long GPU runs).",
                            role="speed")
    store_anchors: bool = setting(False, "Also store each anchor image in its sample.")
    limit: int | None = setting(None, "Only the first N anchors (for trial runs).", ge=1)
    preview: bool = setting(True, "Write preview.png (the first anchors beside their positives) before the long "
                                  "run.", role="logging")


class GenerateJob(DatasetConfig, GenerateSettings):
    """One generation job: the settings, the data, the model and where the shards go."""

    name: str = setting(..., DATASET_HELP,
                        cli="--dataset", min_length=1, max_length=4096)
    shards: str = setting(..., "Output shard directory or URL (s3://bucket/prefix, gs://...); a rerun "
                                 "resumes it.", role="location", min_length=1)
    unet: str | None = setting(None, "Diffusion model folder or hub id [default: the dataset's known model; with "
                                     "--guidance its class-conditional one].")
    seed: int = setting(0, "Job seed; each anchor's noise comes from (seed, anchor index).", ge=0, le=2**63 - 1)
    num_workers: int | None = setting(None, "Job-array size [default: SLURM_ARRAY_TASK_COUNT, else 1].",
                                      role="speed", ge=1)
    worker_index: int | None = setting(None, "This array task's index [default: SLURM_ARRAY_TASK_ID, else 0].",
                                       role="speed", ge=0)
    overwrite: bool = setting(False, "Replace a shard directory made with other settings.", role="location")


class DDPMSettings(Settings):
    """How a diffusion model is trained where none exists; unset values take the preset's."""

    preset: DDPMPreset = setting("auto", "U-Net preset: ddpm-cifar, digits, tiny, or auto (by dataset).")
    steps: int | None = setting(None, "Optimizer steps in total [default: the preset's].", ge=1, le=10_000_000)
    batch_size: int | None = setting(None, "Global batch size over all processes [default: the preset's].",
                                     ge=1, le=65536)
    lr: float | None = setting(None, "AdamW learning rate after warm-up [default: the preset's].", gt=0, le=1)
    warmup_steps: int | None = setting(None, "Linear warm-up steps [default: the preset's].", ge=0)
    ema_decay: float | None = setting(None, "EMA decay of the saved weights [default: the preset's].", ge=0, le=1)
    flip: bool | None = setting(None, "Random horizontal flips [default: the preset's; off for digits].")
    grad_clip: float = setting(1.0, "Gradient-norm clipping.", gt=0, le=1e6)
    conditional: bool = setting(False, "Train a class-conditional model for classifier-free guidance (needs labels): "
                                       "a class embedding of num_classes + 1 rows, row 0 the null class.")
    label_dropout: float = setting(AUTHORS_LABEL_DROPOUT, "With --conditional: probability that a step's whole batch "
                                   "is trained as the null class (the authors' 0.1).", ge=0, le=1)
    init: str | None = setting(None, "Start from this model's weights (folder or hub id of the same U-Net shape); "
                                     "a conditional run from an unconditional model starts its class embedding at "
                                     "zero, i.e. as that model.", min_length=1, max_length=4096)
    checkpoint_every: int = setting(500, "Steps between checkpoints.", role="logging", ge=1)
    sample_every: int = setting(500, "Steps between sample grids (samples.png).", role="logging", ge=1)
    log_every: int = setting(10, "Steps between logged losses.", role="logging", ge=1)
    precision: Precision = setting("auto", PRECISION_HELP)
    tf32: TF32 = same_setting(NumericsSettings, "tf32")


class DDPMJob(DatasetConfig, DDPMSettings):
    """One DDPM training run."""

    @model_validator(mode="after")
    def _dropout_needs_conditional(self) -> DDPMJob:
        if not self.conditional and self.label_dropout != AUTHORS_LABEL_DROPOUT:
            raise ValueError("label_dropout applies to a class-conditional model; add --conditional or leave it out")
        return self

    name: str = setting(..., DATASET_HELP,
                        cli="--dataset", min_length=1, max_length=4096)
    out: str = setting(..., "Output folder; a rerun resumes from its checkpoint.", role="location", min_length=1)
    seed: int = setting(0, "Seed of the initial weights and of every batch.", ge=0, le=2**63 - 1)


class SampleJob(Settings):
    """``clsp ddpm sample``: DDIM samples of a model as one PNG grid."""

    unet: str = setting(..., "Model folder or hub id (e.g. google/ddpm-cifar10-32).", min_length=1)
    out: str = setting(..., "PNG file for the sample grid.", min_length=1)
    num_samples: int = setting(64, "Images in the grid.", ge=1, le=4096)
    steps: int = setting(50, "DDIM steps.", ge=1, le=1000)
    eta: float = setting(0.0, "DDIM stochasticity (0: deterministic, 1: DDPM-like).", ge=0, le=1)
    seed: int = setting(0, "Seed of the initial noise.", ge=0, le=2**63 - 1)
    scale: int | None = setting(None, "Upscale factor of the PNG [default: to about 128 px per image].", ge=1, le=64)
    device: str | None = setting(None, "torch device [default: cuda if available, else cpu].", pattern=DEVICE)


class FIDJob(DatasetConfig):
    """``clsp ddpm fid``: FID of DDIM samples against the real images."""

    name: str = setting(..., "Dataset whose real images the samples are compared with.", cli="--dataset",
                        min_length=1, max_length=4096)
    unet: str = setting(..., "Model folder or hub id.", min_length=1)
    num_samples: int = setting(10_000, "Generated images.", ge=1, le=1_000_000)
    steps: int = setting(100, "DDIM steps per sample.", ge=1, le=1000)
    batch_size: int = setting(256, "Sampling batch size.", ge=1, le=65536)
    seed: int = setting(0, "Seed of the initial noise.", ge=0, le=2**63 - 1)
    device: str | None = setting(None, "torch device [default: cuda if available, else cpu].", pattern=DEVICE)
