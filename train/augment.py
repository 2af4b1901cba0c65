"""The contrastive augmentation of METHOD.md, on CPU workers or batched on the training device.

Every view (two of the real anchor, one of a synthetic positive) gets RandomResizedCrop(size,
scale 0.08-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale p 0.2, a horizontal flip
and normalisation with the dataset's mean and std. The crop's lower scale and the flip are
settable: they suit natural images, but an 8%-area crop of a small handwritten digit no longer
shows the digit and a flip can change which digit it is. Two implementations of the same list:

- ``cpu``: torchvision.transforms.v2, one image at a time, run in DataLoader workers.
- ``device``: kornia.augmentation on whole uint8 batches already on the training device. Each
  sample draws its own parameters (torchvision v2 applied to a batch tensor would draw one set for
  the whole batch). At CIFAR scale per-image augmentation on CPU workers is what starves a GPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from clsp.errors import UserError

AUGMENTS = ("cpu", "device")
CROP_MIN_SCALE = 0.08
FLIP = True
JITTER = (0.4, 0.4, 0.4, 0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2


def crop_scale(crop_min_scale: float) -> tuple[float, float]:
    """RandomResizedCrop's area range ``(crop_min_scale, 1)``; UserError unless the bound is in (0, 1]."""
    if not 0.0 < crop_min_scale <= 1.0:
        raise UserError(f"--crop-min-scale must be in (0, 1], got {crop_min_scale}")
    return (float(crop_min_scale), 1.0)


def cpu_transform(size: int, mean: Sequence[float], std: Sequence[float], crop_min_scale: float = CROP_MIN_SCALE,
                  flip: bool = FLIP) -> nn.Module:
    """Per-image transform: uint8 ``[3, H, W]`` tensor -> normalised float32 ``[3, size, size]``."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=crop_scale(crop_min_scale), antialias=True),
        v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P),
        v2.RandomGrayscale(p=GRAYSCALE_P),
        *([v2.RandomHorizontalFlip()] if flip else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def augment_images(transform: nn.Module, images: Tensor) -> Tensor:
    """Apply a per-image transform to each image of a uint8 ``[B, 3, H, W]`` batch, one draw each."""
    return torch.stack([transform(image) for image in images])


class DeviceAugment(nn.Module):
    """Batched augmentation with per-sample parameters: uint8 ``[B, 3, H, W]`` -> normalised float32.

    Runs on whatever device the batch is on; parameters come from torch's global generator, which
    the caller seeds per step (see ``clsp.train.data.step_seed``) so that a resumed run draws the
    same views.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 crop_min_scale: float = CROP_MIN_SCALE, flip: bool = FLIP) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.pipeline = nn.Sequential(
            # "resample" crops the whole batch with one batched warp; "slice" loops over samples.
            K.RandomResizedCrop((size, size), scale=crop_scale(crop_min_scale), cropping_mode="resample"),
            K.ColorJitter(*JITTER, p=JITTER_P),
            K.RandomGrayscale(p=GRAYSCALE_P),
            *([K.RandomHorizontalFlip()] if flip else []),
            K.Normalize(torch.tensor(mean), torch.tensor(std)),
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.pipeline(images.float().div_(255.0))
