"""``clsp ddpm``: train, sample and score unconditional DDPM models."""

from __future__ import annotations

import click

from clsp.errors import Group
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.runtime import PRECISIONS

_SETTINGS = {"show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(cls=Group, context_settings=_SETTINGS)
def ddpm() -> None:
    """Train, sample and score unconditional DDPM models (diffusers UNet2DModel + DDPMScheduler)."""


@ddpm.command(context_settings=_SETTINGS)
@click.option("--dataset", required=True, help="Dataset registry name (digits, cifar10, imagefolder:PATH, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder; a rerun resumes from its checkpoint.")
@click.option("--preset", default="auto", help="U-Net preset: ddpm-cifar, digits, tiny, or auto (by dataset).")
@click.option("--steps", type=int, default=None, help="Optimizer steps in total [default: the preset's].")
@click.option("--batch-size", type=int, default=None, help="Global batch size over all processes [default: the preset's].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate after warm-up [default: the preset's].")
@click.option("--warmup-steps", type=int, default=None, help="Linear warm-up steps [default: the preset's].")
@click.option("--ema-decay", type=float, default=None, help="EMA decay of the saved weights [default: the preset's].")
@click.option("--flip/--no-flip", default=None, help="Random horizontal flips [default: the preset's; off for digits].")
@click.option("--checkpoint-every", type=int, default=500, help="Steps between checkpoints.")
@click.option("--sample-every", type=int, default=500, help="Steps between sample grids (samples.png).")
@click.option("--image-size", type=int, default=None, help="Resize the images to this size [default: the dataset's].")
@click.option("--data-root", default=DEFAULT_DATA_ROOT, help="Where datasets are stored or downloaded.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", help="auto: bf16 autocast on GPUs, fp32 on CPUs.")
@click.option("--seed", type=int, default=0, help="Seed of the initial weights and of every batch.")
def train(**kwargs) -> None:
    """Train an unconditional DDPM; writes a DDPMPipeline folder with the EMA weights.

    Runs on a CPU or one GPU as is, and on many GPUs and nodes under accelerate:

    \b
    `accelerate launch --multi_gpu --num_processes N $(which clsp) ddpm train ...`.
    """
    from clsp.generate.ddpm_training import TrainConfig, train_ddpm

    summary = train_ddpm(TrainConfig(**kwargs))
    click.echo(f"wrote {kwargs['out']} ({summary['steps']} steps, {summary['wall_time_s']:.0f} s, "
               f"final loss {summary['final_loss']})")


@ddpm.command(context_settings=_SETTINGS)
@click.option("--unet", required=True, help="Model folder or hub id (e.g. google/ddpm-cifar10-32).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file for the sample grid.")
@click.option("--num-samples", type=int, default=64, help="Images in the grid.")
@click.option("--steps", type=int, default=50, help="DDIM steps.")
@click.option("--eta", type=float, default=0.0, help="DDIM stochasticity (0: deterministic, 1: DDPM-like).")
@click.option("--seed", type=int, default=0, help="Seed of the initial noise.")
@click.option("--scale", type=int, default=None, help="Upscale factor of the PNG [default: to about 128 px per image].")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
def sample(unet: str, out: str, num_samples: int, steps: int, eta: float, seed: int, scale: int | None,
           device: str | None) -> None:
    """Draw unconditional DDIM samples from a model and write them as one PNG grid."""
    import torch

    from clsp.generate.unet import load_unet, sample_images, save_grid

    model, scheduler = load_unet(unet, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = sample_images(model, scheduler, num_samples, steps=steps, eta=eta, seed=seed)
    save_grid(images, out, scale=scale or max(1, 128 // images.shape[1]))
    click.echo(f"wrote {num_samples} samples to {out}")


@ddpm.command(context_settings=_SETTINGS)
@click.option("--unet", required=True, help="Model folder or hub id.")
@click.option("--dataset", required=True, help="Dataset whose real images the samples are compared with.")
@click.option("--split", default=None, help="Real split [default: the dataset's training split].")
@click.option("--num-samples", type=int, default=10_000, help="Generated images.")
@click.option("--steps", type=int, default=100, help="DDIM steps per sample.")
@click.option("--batch-size", type=int, default=256, help="Sampling batch size.")
@click.option("--data-root", default=DEFAULT_DATA_ROOT, help="Where datasets are stored or downloaded.")
@click.option("--seed", type=int, default=0, help="Seed of the initial noise.")
@click.option("--device", default=None, help="torch device [default: cuda if available, else cpu].")
def fid(**kwargs) -> None:
    """FID of DDIM samples against the real images (needs `pip install clsp[fid]` and Inception weights)."""
    from clsp.generate.fid import compute_fid

    result = compute_fid(**kwargs)
    click.echo(f"FID {result['fid']:.2f} ({result['num_samples']} samples vs {result['num_real']} real images "
               f"of {result['dataset']})")
