"""The contrastive augmentation of METHOD.md, on CPU workers or batched on the training device.

Every view (two of the real anchor, one of a synthetic positive) gets RandomResizedCrop(size,
scale 0.08-1), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale p 0.2, a horizontal flip
and normalisation with the dataset's mean and std. Two implementations of the same list:

- ``cpu``: torchvision.transforms.v2, one image at a time, run in DataLoader workers.
- ``device``: kornia.augmentation on whole uint8 batches already on the training device. Each
  sample draws its own parameters (torchvision v2 applied to a batch tensor would draw one set for
  the whole batch). At CIFAR scale per-image augmentation on CPU workers is what starves a GPU.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

AUGMENTS = ("cpu", "device")
CROP_SCALE = (0.08, 1.0)
JITTER = (0.4, 0.4, 0.4, 0.1)
JITTER_P = 0.8
GRAYSCALE_P = 0.2


def cpu_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Per-image transform: uint8 ``[3, H, W]`` tensor -> normalised float32 ``[3, size, size]``."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=CROP_SCALE, antialias=True),
        v2.RandomApply([v2.ColorJitter(*JITTER)], p=JITTER_P),
        v2.RandomGrayscale(p=GRAYSCALE_P),
        v2.RandomHorizontalFlip(),
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

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.pipeline = nn.Sequential(
            # "resample" crops the whole batch with one batched warp; "slice" loops over samples.
            K.RandomResizedCrop((size, size), scale=CROP_SCALE, cropping_mode="resample"),
            K.ColorJitter(*JITTER, p=JITTER_P),
            K.RandomGrayscale(p=GRAYSCALE_P),
            K.RandomHorizontalFlip(),
            K.Normalize(torch.tensor(mean), torch.tensor(std)),
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.pipeline(images.float().div_(255.0))
