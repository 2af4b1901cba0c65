"""Named U-Net architectures and training defaults for ``clsp ddpm train``.

A preset fixes the diffusers ``UNet2DModel`` shape and the defaults a user would otherwise have to
find by trial: batch size, learning rate, steps, EMA decay and whether horizontal flips are a valid
augmentation (they are not for digits: a mirrored 2 is no digit at all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers import UNet2DModel

from clsp.datasets import dataset_info
from clsp.errors import UserError


@dataclass(frozen=True)
class Preset:
    """A U-Net architecture (``UNet2DModel`` keyword arguments without ``sample_size``) and its training defaults."""

    name: str
    description: str
    unet: dict[str, Any] = field(repr=False)
    batch_size: int = 128
    lr: float = 2e-4
    steps: int = 100_000
    warmup_steps: int = 1000
    ema_decay: float = 0.9999
    flip: bool = True


# The DDPM CIFAR-10 architecture of Ho et al. (2020), as in google/ddpm-cifar10-32's config.json:
# 35.7 M parameters, self-attention at 16x16 (the second down block), dropout 0.1.
DDPM_CIFAR = Preset(
    name="ddpm-cifar",
    description=("DDPM CIFAR-10 U-Net of Ho et al. (35.7M params at 32x32): channels 128/256/256/256, "
                 "attention at 16x16"),
    unet=dict(
        in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32, norm_eps=1e-6, act_fn="silu", downsample_padding=0, flip_sin_to_cos=False,
        freq_shift=1, mid_block_scale_factor=1, attention_head_dim=None, dropout=0.1,
    ),
    batch_size=128, lr=2e-4, steps=800_000, warmup_steps=5000, ema_decay=0.9999, flip=True,
)

# 1.1 M parameters, three resolution levels (16 -> 8 -> 4 at 16x16) with attention at 8x8 and 4x4:
# depth rather than width, so the 4x4 bottleneck that the generation stage mixes carries the digit's identity.
DIGITS = Preset(
    name="digits",
    description="small U-Net for 16x16 digits (1.2M params): channels 32/64/64, attention at the two lower levels",
    unet=dict(
        in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    batch_size=128, lr=1e-3, steps=3000, warmup_steps=100, ema_decay=0.999, flip=False,
)

# For tests and smoke runs: 45 k parameters, seconds per hundred steps on a CPU.
TINY = Preset(
    name="tiny",
    description="45k-param U-Net for tests and smoke runs: channels 8/16, attention at the lower level",
    unet=dict(
        in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ),
    batch_size=16, lr=1e-3, steps=200, warmup_steps=10, ema_decay=0.99, flip=True,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (DDPM_CIFAR, DIGITS, TINY)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for_dataset(dataset_name: str) -> Preset:
    """The preset ``--preset auto`` picks: ``digits`` for digits, the DDPM CIFAR architecture otherwise."""
    info = dataset_info(dataset_name)
    return PRESETS[info.ddpm_preset if info is not None else DDPM_CIFAR.name]


def check_image_size(preset: Preset, image_size: int) -> None:
    """Refuse an image size the preset cannot halve at each of its levels."""
    levels = len(preset.unet["block_out_channels"])
    factor = 2 ** (levels - 1)
    if image_size % factor:
        suggestion = max(factor, image_size // factor * factor)
        raise UserError(f"preset {preset.name} halves the image {levels - 1} times, so the image size must be a "
                        f"multiple of {factor}, not {image_size}; pass --image-size {suggestion}")


def build_unet(preset: Preset, image_size: int, num_classes: int = 0) -> UNet2DModel:
    """A freshly initialised U-Net of the preset's shape for ``image_size`` x ``image_size`` images; with
    ``num_classes``, class-conditional (``num_classes + 1`` class embeddings, 0 the null class)."""
    check_image_size(preset, image_size)
    classes = {"num_class_embeds": num_classes + 1} if num_classes else {}
    return UNet2DModel(sample_size=image_size, **preset.unet, **classes)
