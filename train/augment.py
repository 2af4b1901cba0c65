"""The contrastive augmentation of METHOD.md, on CPU workers or batched on the training device.

Each view gets RandomResizedCrop, ColorJitter with probability p, RandomGrayscale, an optional horizontal
flip, an optional solarization and normalisation with the dataset's mean and std; the parameters of each
list are a ``ViewAugmentation`` of the method's recipe (``clsp.train.recipes``). Two implementations of
the same list:

- ``cpu``: torchvision.transforms.v2, one image at a time, run in DataLoader workers.
- ``device``: kornia.augmentation on whole uint8 batches already on the training device. Each
  sample draws its own parameters (torchvision v2 applied to a batch tensor would draw one set for
  the whole batch). At CIFAR scale per-image augmentation on CPU workers is what starves a GPU.
  Colour jitter is ``ColorJitterPerImage``: kornia's ColorJitter draws the order of its four steps
  once per batch, torchvision's (the authors') once per image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from clsp.train.recipes import RECIPES, ViewAugmentation


def view_augmentations(method: str | None, settings: Mapping[str, Any]) -> tuple[ViewAugmentation, ViewAugmentation]:
    """The two real views' lists of a run: its method's recipe with the run's crop scale and flip
    (``settings`` as a resolved training configuration or an encoder card records them)."""
    recipe = RECIPES.get(method or "")
    first = recipe.augmentation if recipe else ViewAugmentation()
    second = recipe.second_view if recipe and recipe.second_view else first
    chosen = {key: settings[key] for key in ("crop_min_scale", "flip") if settings.get(key) is not None}
    return dataclasses.replace(first, **chosen), dataclasses.replace(second, **chosen)


def cpu_transform(size: int, mean: Sequence[float], std: Sequence[float], view: ViewAugmentation) -> nn.Module:
    """Per-image transform: uint8 ``[3, H, W]`` tensor -> normalised float32 ``[3, size, size]``."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(view.crop_min_scale, 1.0), antialias=True),
        v2.RandomApply([v2.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)], p=view.jitter_p),
        v2.RandomGrayscale(p=view.grayscale_p),
        *([v2.RandomHorizontalFlip()] if view.flip else []),
        *([v2.RandomSolarize(threshold=128, p=view.solarize_p)] if view.solarize_p > 0 else []),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def augment_images(transform: nn.Module, images: Tensor) -> Tensor:
    """Apply a per-image transform to each image of a uint8 ``[B, 3, H, W]`` batch, one draw each."""
    return torch.stack([transform(image) for image in images])


def _adjust_hue_turns(images: Tensor, turns: Tensor) -> Tensor:
    """Hue shifted by ``turns`` of the colour circle per image, torchvision's unit (kornia's is radians)."""
    from kornia.enhance import adjust_hue

    return adjust_hue(images, turns * 2 * torch.pi)


class ColorJitterPerImage(nn.Module):
    """torchvision's ColorJitter applied with probability ``p``, on a float ``[B, 3, H, W]`` batch in [0, 1],
    with everything drawn per image: whether it applies, the four factors and the order of the four steps.

    The steps are kornia's batched forms of torchvision's formulas (brightness scales, contrast blends with the
    grey mean, saturation with the grey image, hue shifts in HSV), each taking one factor per image. Every
    position of the order runs each step on the whole batch and keeps it where that image's order puts it,
    so no image waits for another and nothing syncs with the host.
    """

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float) -> None:
        super().__init__()
        from kornia import enhance

        self.p = p
        # (low, high) of each factor as torchvision draws it; None: the step never changes an image
        self.ranges = [(max(0.0, 1 - v), 1 + v) if v > 0 else None for v in (brightness, contrast, saturation)]
        self.ranges.append((-hue, hue) if hue > 0 else None)
        self.steps = (enhance.adjust_brightness_accumulative, enhance.adjust_contrast_with_mean_subtraction,
                      enhance.adjust_saturation_with_gray_subtraction, _adjust_hue_turns)

    def draw(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The parameters of ``batch`` images: ``applied`` [B] bool, ``factors`` [B, 4] (brightness, contrast,
        saturation, hue; neutral where a step is off), ``order`` [B, 4] (a permutation of the steps per row)."""
        applied = torch.rand(batch, device=device) < self.p
        factors = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device).repeat(batch, 1)
        for k, bounds in enumerate(self.ranges):
            if bounds is not None:
                factors[:, k].uniform_(*bounds)
        order = torch.rand(batch, 4, device=device).argsort(dim=1)
        return {"applied": applied, "factors": factors, "order": order}

    def apply_params(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``images`` jittered with ``params`` (from ``draw``); not ``apply``, which ``nn.Module`` owns."""
        out = images
        for position in range(4):
            for k, step in enumerate(self.steps):
                if self.ranges[k] is None:
                    continue
                here = (params["applied"] & (params["order"][:, position] == k)).view(-1, 1, 1, 1)
                out = torch.where(here, step(out, params["factors"][:, k]), out)
        return out

    def forward(self, images: Tensor) -> Tensor:
        return self.apply_params(images, self.draw(len(images), images.device))


class DeviceAugment(nn.Module):
    """Batched augmentation with per-sample parameters: uint8 ``[B, 3, H, W]`` -> normalised float32.

    Runs on whatever device the batch is on; parameters come from torch's global generator, which
    the caller seeds per step (see ``clsp.train.data.step_seed``) so that a resumed run draws the
    same views.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], view: ViewAugmentation) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.pipeline = nn.Sequential(
            # "resample" crops the whole batch with one batched warp; "slice" loops over samples.
            K.RandomResizedCrop((size, size), scale=(view.crop_min_scale, 1.0), cropping_mode="resample"),
            ColorJitterPerImage(view.brightness, view.contrast, view.saturation, view.hue, p=view.jitter_p),
            K.RandomGrayscale(p=view.grayscale_p),
            *([K.RandomHorizontalFlip()] if view.flip else []),
            # threshold exactly 0.5 of the [0, 1] range, as torchvision's 128 of 255
            *([K.RandomSolarize(thresholds=0.0, additions=0.0, p=view.solarize_p)] if view.solarize_p > 0 else []),
            K.Normalize(torch.tensor(mean), torch.tensor(std)),
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.pipeline(images.float().div_(255.0))
