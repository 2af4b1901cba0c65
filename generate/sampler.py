"""Interpolated DDIM sampling (METHOD.md section 2): synthetic positives whose bottleneck is pulled to an anchor.

The loop joins the two halves of the method: the interpolated noise prediction of the split U-Net
(``clsp.generate.unet_split``) and the DDIM update of a ``DDIMScheduler`` built from the model's scheduler
config (``clsp.generate.ddim``). This module owns the randomness (x_T, anchor noise, eta noise, per anchor)
and the checks on what a caller passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from clsp.errors import UserError
from clsp.generate.conditional import check_guidance, check_labels, embedding_index, num_classes
from clsp.generate.ddim import ddim_scheduler, ddim_update, q_sample, timestep_pairs
from clsp.generate.unet_split import (
    check_mix_depth,
    check_splittable,
    check_w,
    eval_mode,
    interpolated_noise_prediction,
    num_skips,
)
from clsp.runtime import autocast
from clsp.runtime import progress as progress_bar

__all__ = ["Generators", "interpolated_noise_prediction", "num_skips", "sample_positives"]

Generators = torch.Generator | Sequence[torch.Generator] | None


def _check_sampling(unet: UNet2DModel, anchors: torch.Tensor, num_candidates: int, steps: int, eta: float,
                    generator: Generators, num_train_timesteps: int) -> None:
    size = unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    expected = (unet.config.in_channels, *size)
    if anchors.ndim != 4 or tuple(anchors.shape[1:]) != expected or anchors.shape[0] < 1:
        raise UserError(f"anchors must be [batch, {', '.join(map(str, expected))}] images in [-1, 1] for this "
                        f"U-Net, got {list(anchors.shape)}; resize the dataset to the model's sample size")
    if not anchors.is_floating_point() or anchors.numel() and anchors.abs().max() > 1.0 + 1e-3:
        raise UserError("anchors must be float images scaled to [-1, 1] (x / 127.5 - 1 for uint8 pixels)")
    if num_candidates < 1:
        raise UserError(f"num_candidates must be at least 1, got {num_candidates}")
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"steps must be between 1 and the model's {num_train_timesteps} training timesteps, "
                        f"got {steps}")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"eta must be in [0, 1] (0 = deterministic DDIM), got {eta}")
    if isinstance(generator, (list, tuple)) and len(generator) != anchors.shape[0]:
        raise UserError(f"got {len(generator)} generators for {anchors.shape[0]} anchors; pass one per anchor "
                        "or a single generator")


def _layout(images: torch.Tensor) -> torch.Tensor:
    """Channels-last on CUDA, where cuDNN's bf16 convolutions are fastest in it; unchanged elsewhere."""
    return images.contiguous(memory_format=torch.channels_last) if images.is_cuda else images


@torch.inference_mode()
def sample_positives(unet: UNet2DModel, scheduler: Any, anchors: torch.Tensor, num_candidates: int,
                     w: float = 0.1, steps: int = 100, eta: float = 0.1, generator: Generators = None,
                     precision: str = "auto", share_anchor_pass: bool = False, mix_depth: int = 0,
                     progress: bool = False, labels: torch.Tensor | None = None,
                     guidance: float | None = None) -> torch.Tensor:
    """``num_candidates`` synthetic positives per anchor by interpolated DDIM: ``[B, k, C, H, W]`` in [-1, 1].

    ``anchors`` are ``[B, C, H, W]`` images in [-1, 1]; ``scheduler`` is the model's DDPM or DDIM scheduler,
    whose config ``clsp.generate.ddim.ddim_scheduler`` honours or refuses. Each candidate starts from its own
    x_T. With a list of generators (one per anchor) all randomness of anchor b (its x_T's, anchor noise, eta
    noise) comes from generator b, so an anchor's candidates do not depend on the other anchors in the batch.
    With ``share_anchor_pass`` an anchor's noised copy and encoder pass are shared by its candidates at every
    step (cheaper; METHOD.md section 2 draws fresh anchor noise per candidate). ``w`` and ``mix_depth`` are
    those of ``interpolated_noise_prediction``. On CUDA the model is converted to channels-last in place;
    ``precision`` "auto" means bf16 autocast on CUDA and on CPUs with bf16 units. A class-conditional model
    draws each anchor's candidates for its dataset label (``labels``, ``[B]``) with classifier-free ``guidance``
    (``clsp.generate.conditional``; needed for such a model, refused for an unconditional one).
    """
    check_splittable(unet)
    ddim = ddim_scheduler(scheduler, unet.device)
    check_w(w)
    _check_sampling(unet, anchors, num_candidates, steps, eta, generator, ddim.config.num_train_timesteps)
    check_mix_depth(unet, mix_depth)
    classes = num_classes(unet)
    check_guidance(classes, guidance)
    condition: dict[str, Any] = {}  # a conditional model's label per candidate row, and the guidance weight
    if classes:
        index = embedding_index(check_labels(classes, labels, anchors.shape[0]))
        condition = {"class_labels": index.to(unet.device).repeat_interleave(num_candidates), "guidance": guidance}
    if isinstance(generator, tuple):
        generator = list(generator)
    device = unet.device
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    batch, channels, height, width = anchors.shape
    k = num_candidates
    anchors = anchors.to(device=device, dtype=torch.float32)[:, None]
    noise_rows = 1 if share_anchor_pass else k

    def noise(rows: int) -> torch.Tensor:
        return randn_tensor((batch, rows, channels, height, width), generator=generator, device=device,
                            dtype=torch.float32)

    x = noise(k).flatten(0, 1)
    pairs = timestep_pairs(ddim.config.num_train_timesteps, steps)
    times = torch.tensor([t for t, _ in pairs], device=device)  # on the device once: no host copy (or sync) per step
    with eval_mode(unet), autocast(device, precision):
        for step, (t, t_next) in enumerate(progress_bar(pairs, desc="DDIM", unit="step") if progress else pairs):
            anchor_t = q_sample(ddim, anchors, noise(noise_rows), times[step]).flatten(0, 1)
            output = interpolated_noise_prediction(unet, _layout(x), times[step], _layout(anchor_t), w, mix_depth,
                                                   **condition).float()
            z = noise(k).flatten(0, 1) if eta > 0 and t_next >= 0 else None
            x = ddim_update(ddim, output, t, t_next, x, eta, z)
    return x.clamp(-1, 1).reshape(batch, k, channels, height, width).contiguous()
