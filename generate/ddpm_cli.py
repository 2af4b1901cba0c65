"""``clsp ddpm``: train, sample and score DDPM models (unconditional or class-conditional); options derive from
``clsp.generate.config`` (``DDPMJob``, ``SampleJob``, ``FIDJob``)."""

from __future__ import annotations

import click

from clsp.config import click_options, parse
from clsp.errors import SETTINGS, Group
from clsp.generate.authors_unet import ConvertJob
from clsp.generate.config import DDPMJob, FIDJob, SampleJob


@click.group(cls=Group, context_settings=SETTINGS)
def ddpm() -> None:
    """Train, sample and score DDPM models (diffusers UNet2DModel + DDPMScheduler)."""


@ddpm.command(context_settings=SETTINGS)
@click_options(DDPMJob)
def train(**options) -> None:
    """Train a DDPM (class-conditional with --conditional); writes a DDPMPipeline folder with the EMA weights.

    Runs on a CPU or one GPU as is, and on many GPUs and nodes under accelerate:

    \b
    `accelerate launch --multi_gpu --num_processes N $(which clsp) ddpm train ...`.
    """
    from clsp.generate.ddpm_training import train_ddpm

    job = parse(DDPMJob, options)
    summary = train_ddpm(job)
    click.echo(f"wrote {job.out} ({summary['steps']} steps, {summary['wall_time_s']:.0f} s, "
               f"final loss {summary['final_loss']})")


@ddpm.command(context_settings=SETTINGS)
@click_options(SampleJob)
def sample(**options) -> None:
    """Draw DDIM samples from a model (a conditional one: the classes in turn, guidance 1.8) as one PNG grid."""
    import torch

    from clsp.generate.unet import load_unet, sample_images, save_grid

    job = parse(SampleJob, options)
    model, scheduler = load_unet(job.unet, job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = sample_images(model, scheduler, job.num_samples, steps=job.steps, eta=job.eta, seed=job.seed)
    save_grid(images, job.out, scale=job.scale or max(1, 128 // images.shape[1]))
    click.echo(f"wrote {job.num_samples} samples to {job.out}")


@ddpm.command(context_settings=SETTINGS)
@click_options(FIDJob)
def fid(**options) -> None:
    """FID of DDIM samples against the real images (needs `pip install clsp[fid]` and Inception weights)."""
    from clsp.generate.fid import compute_fid

    job = parse(FIDJob, options)
    result = compute_fid(job.unet, job.name, split=job.split, num_samples=job.num_samples, steps=job.steps,
                         batch_size=job.batch_size, data_root=job.data_root, seed=job.seed, device=job.device)
    click.echo(f"FID {result['fid']:.2f} ({result['num_samples']} samples vs {result['num_real']} real images "
               f"of {result['dataset']})")


@ddpm.command(context_settings=SETTINGS)
@click.argument("checkpoint")
@click_options(ConvertJob, exclude=("checkpoint",))
def convert(checkpoint: str, **options) -> None:
    """Convert the authors' DDPM CHECKPOINT (their U-Net's state_dict) into a folder `clsp-gen --unet` loads.

    The YAML is their diffusion config (configs/diffusion_cifar10.yaml). Their split layout (time_embedding.*,
    encoder.*, decoder.*; the encoder's projector head is ignored) and pytorch-ddpm's flat one are read. The
    conversion is exact: the same noise prediction, and the same positives from the interpolated sampler.
    """
    from clsp.generate.authors_unet import convert as convert_checkpoint

    job = parse(ConvertJob, {"checkpoint": checkpoint, **options})
    out = convert_checkpoint(job)
    click.echo(f"wrote {out}: the authors' U-Net as a diffusers UNet2DModel with its DDPM schedule; "
               f"sample from it with `clsp-gen --unet {out}`")
