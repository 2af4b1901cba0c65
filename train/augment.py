"""The contrastive augmentation of METHOD.md, on CPU workers or batched on the training device.

Each view gets RandomResizedCrop, ColorJitter with probability p, RandomGrayscale, an optional horizontal
flip, an optional solarization and normalisation with the dataset's mean and std; the parameters of each
list are a ``ViewAugmentation`` of the method's recipe (``clsp.train.recipes``). Two implementations of
the same list:

- ``cpu``: torchvision.transforms.v2, one image at a time, run in DataLoader workers.
- ``device``: whole uint8 batches already on the training device, every parameter drawn per sample on
  that device (torchvision v2 applied to a batch tensor would draw one set for the whole batch) with
  torchvision's distributions, and applied in a few dozen batched kernels: the crop and the flip are one
  bilinear ``grid_sample``, the colour jitter four blended steps whose order is drawn per image (kornia's
  ColorJitter draws it once per batch, torchvision's, the authors', once per image). Nothing syncs with the
  host, so a step is not bound by kernel launches at CIFAR sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.recipes import RECIPES, ViewAugmentation

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios (torchvision's default)
CROP_ATTEMPTS = 10  # torchvision's tries before its centre-crop fallback
GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_AT = 0.5  # of the [0, 1] range, as torchvision's 128 of 255 on uint8 pixels


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
        v2.RandomResizedCrop(size, scale=(view.crop_min_scale, 1.0), ratio=CROP_RATIO, antialias=True),
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


def draw_crops(batch: int, height: int, width: int, min_scale: float | Tensor,
               device: torch.device | str = "cpu") -> Tensor:
    """RandomResizedCrop's boxes, torchvision's ``get_params`` for ``batch`` images at once: float
    ``[B, 4]`` of (top, left, height, width) in whole pixels.

    Each image tries ``CROP_ATTEMPTS`` (area, aspect) draws and keeps the first that fits, else takes
    torchvision's centre crop; the position is uniform over the places the box fits. ``min_scale``: one for
    all, or one per image ([B])."""
    area = height * width
    low = min_scale.view(-1, 1) if isinstance(min_scale, Tensor) else min_scale
    target = (torch.rand(batch, CROP_ATTEMPTS, device=device) * (1 - low) + low).mul_(area)
    aspect = torch.empty(batch, CROP_ATTEMPTS, device=device).uniform_(*map(math.log, CROP_RATIO)).exp_()
    box_h, box_w = (target / aspect).sqrt_().round_(), (target * aspect).sqrt_().round_()
    fits = (box_h > 0) & (box_h <= height) & (box_w > 0) & (box_w <= width)
    first = fits.byte().argmax(dim=1, keepdim=True)  # the first try that fits (0 where none does: replaced below)
    found = fits.any(dim=1)
    fallback_h, fallback_w = _centre_crop(height, width)
    box_h = torch.where(found, box_h.gather(1, first)[:, 0], fallback_h)
    box_w = torch.where(found, box_w.gather(1, first)[:, 0], fallback_w)
    top, left = torch.rand(batch, 2, device=device).unbind(dim=1)
    return torch.stack([(top * (height + 1 - box_h)).floor_(), (left * (width + 1 - box_w)).floor_(), box_h, box_w],
                       dim=1)


def _centre_crop(height: int, width: int) -> tuple[float, float]:
    """torchvision's fallback box (height, width): the whole image, cut to the nearest allowed aspect."""
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        return float(round(width / CROP_RATIO[0])), float(width)
    if aspect > CROP_RATIO[1]:
        return float(height), float(round(height * CROP_RATIO[1]))
    return float(height), float(width)


def resized_crop(images: Tensor, boxes: Tensor, flip: Tensor, size: int) -> Tensor:
    """Each image's box resized to ``size`` x ``size`` (bilinear, as torchvision's ``resized_crop`` without
    antialiasing) and mirrored where ``flip``: one ``grid_sample`` for the batch.

    Output pixel centres map onto the box as a resize of the cropped image maps them, and sample positions
    are clamped to the box's outer pixel centres, so no pixel outside the box leaks in at its border."""
    height, width = images.shape[-2:]
    centres = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # of the output, in (0, 1)
    top, left, box_h, box_w = boxes[:, :, None].unbind(dim=1)  # [B, 1] each
    across = torch.where(flip[:, None], 1 - centres, centres)  # [B, size]: a mirrored view reads right to left
    # positions in pixels, clamped to the box's pixel centres, then in grid_sample's [-1, 1] (align_corners=False)
    ys = (top + centres * box_h).clamp_(top + 0.5, top + box_h - 0.5) * (2 / height) - 1
    xs = (left + across * box_w).clamp_(left + 0.5, left + box_w - 0.5) * (2 / width) - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grey(images: Tensor) -> Tensor:
    """torchvision's luma of a float ``[B, 3, H, W]`` batch, ``[B, 1, H, W]`` (its ``rgb_to_grayscale``)."""
    red, green, blue = images.unbind(dim=1)
    return red.mul(GREY[0]).add_(green, alpha=GREY[1]).add_(blue, alpha=GREY[2]).unsqueeze(1)


def draw_jitter(batch: int, low: Tensor, span: Tensor, p: float | Tensor,
                device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """ColorJitter's parameters of ``batch`` images: ``applied`` [B] bool (with probability ``p``), ``factors``
    [B, 4] (brightness, contrast, saturation, hue: uniform on ``low`` + [0, ``span``)), ``order`` [B, 4] (a
    permutation of the steps per row). ``low``, ``span`` and ``p`` are one for all or one row per image."""
    applied = torch.rand(batch, device=device) < p
    factors = torch.rand(batch, 4, device=device) * span + low
    order = torch.rand(batch, 4, device=device).argsort(dim=1)
    return {"applied": applied, "factors": factors, "order": order}


class ColorJitterPerImage(nn.Module):
    """torchvision's ColorJitter applied with probability ``p``, on a float ``[B, 3, H, W]`` batch in [0, 1],
    with everything drawn per image: whether it applies, the four factors and the order of the four steps.

    Brightness, contrast and saturation are each a blend ``clamp(f x + (1 - f) target)`` with black, the
    image's mean grey and its grey image, so every position of the order is one blend whose coefficients
    each image takes from the step its order puts there, plus the hue shift where that step is hue: four
    positions, each a handful of batched kernels, and no host sync.
    """

    low: Tensor
    span: Tensor
    hue_offsets: Tensor

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float, p: float) -> None:
        super().__init__()
        self.p = p
        # (low, high) of each factor as torchvision draws it; None: the step never changes an image
        self.ranges = [(max(0.0, 1 - v), 1 + v) if v > 0 else None for v in (brightness, contrast, saturation)]
        self.ranges.append((-hue, hue) if hue > 0 else None)
        # uniform draws scaled on the device (no host copy per step); an off step's factor is neutral
        low = [r[0] if r else neutral for r, neutral in zip(self.ranges, (1.0, 1.0, 1.0, 0.0))]
        self.register_buffer("low", torch.tensor(low), persistent=False)
        self.register_buffer("span", torch.tensor([r[1] - r[0] if r else 0.0 for r in self.ranges]), persistent=False)
        # RGB from HSV: channel n (r, g, b = 5, 3, 1) = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
        self.register_buffer("hue_offsets", torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1), persistent=False)

    def draw(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The parameters of ``batch`` images (``draw_jitter``; factors neutral where a step is off)."""
        return draw_jitter(batch, self.low, self.span, self.p, device)

    def apply_params(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``images`` jittered with ``params`` (from ``draw``); not ``apply``, which ``nn.Module`` owns."""
        order, applied = params["order"], params["applied"][:, None]
        factor = params["factors"].gather(1, order)  # [B, position]: the factor of the step at that position
        runs = (order == torch.arange(4, device=order.device).view(4, 1, 1)) & applied  # [step, B, position]
        # per position: out = clamp(a x + b mean_grey + c grey), or the hue shift where the step is hue
        a = torch.where(runs[0] | runs[1] | runs[2], factor, 1.0)
        b, c = torch.where(runs[1:3], 1 - factor, 0.0)
        coefficients = torch.stack([a, b, c]).permute(2, 0, 1)[..., None, None, None]  # [position, 3, B, 1, 1, 1]
        hue_here = runs[3].T[..., None, None, None]  # [position, B, 1, 1, 1]
        sixths = torch.where(runs[3], 6 * factor, 0.0).T[..., None, None, None]
        out = images
        for position in range(4):
            luma = grey(out)
            a, b, c = coefficients[position].unbind(0)
            blended = torch.addcmul(torch.addcmul(b * luma.mean(dim=(2, 3), keepdim=True), c, luma), a, out)
            out = torch.where(hue_here[position], self._shift_hue(out, sixths[position]), blended.clamp_(0, 1))
        return out

    def _shift_hue(self, images: Tensor, sixths: Tensor) -> Tensor:
        """torchvision's ``adjust_hue`` (in HSV) with the hue of each image shifted by ``sixths`` [B, 1, 1, 1]
        sixths of the colour circle, for the whole batch at once."""
        value, top = images.max(dim=1, keepdim=True)  # top: the first channel at the maximum (torchvision's tie)
        spread = value - images.amin(dim=1, keepdim=True)  # = value x saturation
        # hue in sixths: channel c largest -> 2c + (next channel - the one after) / spread
        across = images.roll(-1, dims=1) - images.roll(-2, dims=1)
        hue = across.gather(1, top) / spread.clamp_min(1e-12) + 2 * top + sixths
        k = (hue + self.hue_offsets).remainder_(6)
        return value - spread * torch.minimum(k, 4 - k).clamp_(0, 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.apply_params(images, self.draw(len(images), images.device))


class DeviceAugment(nn.Module):
    """Batched augmentation with per-sample parameters: uint8 ``[B, 3, H, W]`` -> normalised float32.

    Runs on whatever device the batch is on; parameters come from torch's global generator of that device,
    which the caller seeds per step (see ``clsp.train.data.step_seed``) so that a resumed run draws the
    same views. ``draw`` and ``apply_params`` are the two halves of ``forward``. Given several lists (an
    asymmetric recipe's two views), each row is augmented by the list ``lists`` names for it, still in one call.
    """

    crop_min: Tensor
    jitter_low: Tensor
    jitter_span: Tensor
    jitter_p: Tensor
    coins: Tensor
    scale: Tensor
    shift: Tensor

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float],
                 views: ViewAugmentation | Sequence[ViewAugmentation]) -> None:
        super().__init__()
        self.size = size
        self.views = tuple(dict.fromkeys((views,) if isinstance(views, ViewAugmentation) else views))  # distinct
        jitters = [ColorJitterPerImage(v.brightness, v.contrast, v.saturation, v.hue, p=v.jitter_p) for v in self.views]
        self.jitter = jitters[0]  # its application does not depend on the list; the draws below do
        # each list's parameters as one row, so that a row per image is one gather on the device
        self._buffer("crop_min", torch.tensor([v.crop_min_scale for v in self.views]))
        self._buffer("jitter_low", torch.stack([j.low for j in jitters]))
        self._buffer("jitter_span", torch.stack([j.span for j in jitters]))
        self._buffer("jitter_p", torch.tensor([j.p for j in jitters]))
        self._buffer("coins", torch.tensor([[0.5 if v.flip else 0.0, v.grayscale_p, v.solarize_p] for v in self.views]))
        # normalisation (x - mean) / std as one fused x * scale + shift
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._buffer("scale", 1 / std_t)
        self._buffer("shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t)
        self.solarize = any(v.solarize_p > 0 for v in self.views)

    def _buffer(self, name: str, values: Tensor) -> None:
        self.register_buffer(name, values, persistent=False)

    def draw(self, batch: int, height: int, width: int, device: torch.device | str = "cpu",
             lists: Tensor | None = None) -> dict[str, Tensor]:
        """Every parameter of ``batch`` views: crop ``boxes`` [B, 4], the jitter's (``draw_jitter``) and the
        ``flip``, ``grayscale`` and ``solarize`` coins [B] (False where the list has no such step); each row by
        the list ``lists`` [B] names (default: the first)."""
        def of(name: str) -> Tensor:  # one row per list: as it is for one list, else gathered per image
            values = getattr(self, name)
            return values if lists is None else values[lists]

        flip, grayscale, solarize = (torch.rand(batch, 3, device=device) < of("coins")).unbind(dim=1)
        jitter = draw_jitter(batch, of("jitter_low"), of("jitter_span"), of("jitter_p"), device)
        return {"boxes": draw_crops(batch, height, width, of("crop_min"), device), **jitter, "flip": flip,
                "grayscale": grayscale, "solarize": solarize}

    def apply_params(self, images: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Float ``[B, 3, H, W]`` images in [0, 1] augmented with ``params`` (from ``draw``), normalised."""
        out = self.jitter.apply_params(resized_crop(images, params["boxes"], params["flip"], self.size), params)
        out = torch.where(params["grayscale"].view(-1, 1, 1, 1), grey(out), out)
        if self.solarize:
            out = torch.where(params["solarize"].view(-1, 1, 1, 1) & (out >= SOLARIZE_AT), 1 - out, out)
        return torch.addcmul(self.shift, out, self.scale)

    @torch.no_grad()
    def forward(self, images: Tensor, lists: Tensor | None = None) -> Tensor:
        batch, _, height, width = images.shape
        return self.apply_params(images.float().div_(255.0), self.draw(batch, height, width, images.device, lists))


def augment_views(augment: DeviceAugment, anchor: Tensor,
                  positive: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The three views of a step in one call: the anchor by view 1's and view 2's lists, the positive by view
    1's (``augment`` holds the two lists, or one for a symmetric recipe). Every image draws its own
    parameters, so the views' distribution is that of three separate calls."""
    inputs = [anchor, anchor] + ([] if positive is None else [positive])
    lists = None
    if len(augment.views) > 1:  # parts in order: view 1, view 2, view 1
        lists = torch.arange(len(inputs), device=anchor.device).remainder_(2).repeat_interleave(len(anchor))
    x1, x2, *x3 = augment(torch.cat(inputs), lists).split(len(anchor))
    return x1, x2, x3[0] if x3 else None
