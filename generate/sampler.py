"""Interpolated DDIM sampling (METHOD.md section 2): synthetic positives whose bottleneck is pulled to an anchor.

The U-Net is split at its bottleneck by running the model's own modules in the order of
``UNet2DModel.forward``: the encoder (time embedding, ``conv_in``, ``down_blocks``, ``mid_block``) and the
decoder (``up_blocks``, ``conv_norm_out``, ``conv_act``, ``conv_out``). Per step the encoder runs once on
the current samples and the noised anchors stacked into one batch, and the decoder runs once on the mixed
bottleneck (and, with ``mix_depth``, the deepest skips), so an interpolated step costs one encoder pass more
than a plain one and nothing else.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from clsp.errors import UserError
from clsp.runtime import autocast, progress as progress_bar

Generators = torch.Generator | Sequence[torch.Generator] | None


def check_splittable(unet: torch.nn.Module) -> None:
    """The split into E and D runs a diffusers ``UNet2DModel``'s own modules, and CLSP's model is unconditional."""
    if not isinstance(unet, UNet2DModel):
        raise UserError(f"interpolated sampling needs a diffusers UNet2DModel, got {type(unet).__name__}; "
                        "load the diffusion model with UNet2DModel.from_pretrained")
    if unet.class_embedding is not None:
        raise UserError("the U-Net is class-conditional (it has a class embedding); CLSP samples from an "
                        "unconditional model: use one trained without num_class_embeds/class_embed_type")


def _check_w(w: float) -> None:
    if not 0.0 <= w <= 1.0:
        raise UserError(f"w must be in [0, 1] (1 = plain sampling, 0 = anchor bottleneck only), got {w}")


def num_skips(unet: UNet2DModel) -> int:
    """How many skip connections the decoder consumes: the largest useful ``mix_depth``."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def _check_mix_depth(unet: UNet2DModel, mix_depth: int) -> None:
    skips = num_skips(unet)
    if isinstance(mix_depth, bool) or not isinstance(mix_depth, int) or not 0 <= mix_depth <= skips:
        raise UserError(f"mix_depth must be an integer from 0 (bottleneck only) to {skips} (every skip of this "
                        f"U-Net), got {mix_depth!r}")


def _check_inputs(unet: UNet2DModel, sample: torch.Tensor, anchor_sample: torch.Tensor) -> None:
    channels = unet.config.in_channels
    if sample.ndim != 4 or sample.shape[1] != channels:
        raise UserError(f"sample must be [batch, {channels}, H, W] for this U-Net, got {list(sample.shape)}")
    if anchor_sample.ndim != 4 or anchor_sample.shape[1:] != sample.shape[1:]:
        raise UserError(f"anchor_sample must be [batch, {', '.join(map(str, sample.shape[1:]))}] like sample, "
                        f"got {list(anchor_sample.shape)}")
    if anchor_sample.shape[0] < 1 or sample.shape[0] % anchor_sample.shape[0]:
        raise UserError(f"sample has {sample.shape[0]} rows, which is not a multiple of the "
                        f"{anchor_sample.shape[0]} anchor rows")


def time_embedding(unet: UNet2DModel, timestep: torch.Tensor | int,
                   sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps broadcast to the batch and their embedding, exactly as ``UNet2DModel.forward`` makes them."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    return timesteps, emb


def encode(unet: UNet2DModel, sample: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """E(x, t): the bottleneck (mid-block output) and the residuals the decoder consumes."""
    skip_sample = sample
    sample = unet.conv_in(sample)
    residuals = (sample,)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            sample, res, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        residuals += res
    if unet.mid_block is not None:
        sample = unet.mid_block(sample, emb)
    return sample, residuals


def _decode(unet: UNet2DModel, sample: torch.Tensor, residuals: tuple, emb: torch.Tensor,
            timesteps: torch.Tensor) -> torch.Tensor:
    """D(h, skips, t): the noise prediction from a bottleneck and the skips."""
    skip_sample = None
    for block in unet.up_blocks:
        count = len(block.resnets)
        res, residuals = residuals[-count:], residuals[:-count]
        if hasattr(block, "skip_conv"):
            sample, skip_sample = block(sample, res, emb, skip_sample)
        else:
            sample = block(sample, res, emb)
    sample = unet.conv_out(unet.conv_act(unet.conv_norm_out(sample)))
    if skip_sample is not None:
        sample = sample + skip_sample
    if unet.config.time_embedding_type == "fourier":
        sample = sample / timesteps.reshape((sample.shape[0], *([1] * (sample.ndim - 1))))
    return sample


def _mix_rows(stacked: torch.Tensor, rows: int, share: int, w: float) -> torch.Tensor:
    """``w * own + (1 - w) * anchor`` for a tensor holding the ``rows`` samples, then their anchors."""
    own, anchor = stacked[:rows], stacked[rows:]
    if share > 1:
        anchor = anchor.repeat_interleave(share, dim=0)
    return torch.lerp(anchor, own, w)


@torch.no_grad()
def interpolated_noise_prediction(unet: UNet2DModel, sample: torch.Tensor, timestep: torch.Tensor | int,
                                  anchor_sample: torch.Tensor, w: float, mix_depth: int = 0) -> torch.Tensor:
    """eps = D(w * h + (1 - w) * h_a, skips, t) with ``h``/``h_a`` the bottlenecks of ``sample``/``anchor_sample``.

    ``mix_depth`` d > 0 also mixes the d deepest skips (the first the decoder consumes) with the same w, the
    anchor's from its own encoder pass, since with the bottleneck alone the decoder still draws much of the
    class from the sample's skips. Only skips at the bottleneck's resolution help: on the shipped digits model
    at w = 0.1, depth 1 keeps the anchor's class in 63 % of positives against 57 % at depth 0, while depth 3
    and more (finer skips, which carry the noised anchor's noise) ruin the samples. At 0 the skips come from
    ``sample`` alone (METHOD.md). Both encoder passes run as one batched call. ``anchor_sample`` may have fewer rows than
    ``sample``: each anchor row then serves ``len(sample) // len(anchor_sample)`` consecutive samples (one
    encoder pass shared by an anchor's candidates). At w = 1 the anchor cannot change the result, so its pass
    is skipped and the output is exactly ``unet(sample, timestep).sample``.
    """
    check_splittable(unet)
    _check_w(w)
    _check_mix_depth(unet, mix_depth)
    _check_inputs(unet, sample, anchor_sample)
    if unet.config.center_input_sample:
        sample, anchor_sample = 2 * sample - 1.0, 2 * anchor_sample - 1.0
    timesteps, emb = time_embedding(unet, timestep, sample)
    rows = sample.shape[0]
    if w == 1.0:
        bottleneck, residuals = encode(unet, sample, emb)
    else:
        share = rows // anchor_sample.shape[0]
        both, residuals = encode(unet, torch.cat([sample, anchor_sample]), torch.cat([emb, emb[::share]]))
        bottleneck = _mix_rows(both, rows, share, w)
        own_only = len(residuals) - mix_depth
        residuals = tuple(res[:rows] if i < own_only else _mix_rows(res, rows, share, w)
                          for i, res in enumerate(residuals))
    return _decode(unet, bottleneck, residuals, emb, timesteps)


def ddim_timestep_pairs(num_train_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """Consecutive (t, t_next) of ``int(linspace(-1, T - 1, S + 1))`` reversed; the last t_next is -1."""
    times = np.linspace(-1, num_train_timesteps - 1, steps + 1).astype(np.int64)[::-1].tolist()
    return list(zip(times[:-1], times[1:]))


def alphas_cumprod(scheduler) -> list[float]:
    """alpha_bar_t of an epsilon-prediction scheduler, t = 0 .. T - 1."""
    values = getattr(scheduler, "alphas_cumprod", None)
    if values is None:
        raise UserError(f"the scheduler {type(scheduler).__name__} has no alphas_cumprod; pass the model's "
                        "DDPMScheduler or DDIMScheduler")
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UserError(f"the scheduler predicts {prediction!r}; CLSP sampling needs an epsilon-prediction model")
    return torch.as_tensor(values, dtype=torch.float64).tolist()


def _check_sampling(unet: UNet2DModel, anchors: torch.Tensor, num_candidates: int, steps: int, eta: float,
                    generator: Generators, num_train_timesteps: int) -> None:
    check_splittable(unet)
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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Sampling needs eval mode (the DDPM U-Nets use dropout); the caller's mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@torch.inference_mode()
def sample_positives(unet: UNet2DModel, scheduler, anchors: torch.Tensor, num_candidates: int,
                     w: float = 0.1, steps: int = 100, eta: float = 0.1, generator: Generators = None,
                     precision: str = "auto", share_anchor_pass: bool = False, mix_depth: int = 0,
                     progress: bool = False) -> torch.Tensor:
    """``num_candidates`` synthetic positives per anchor by interpolated DDIM: ``[B, k, C, H, W]`` in [-1, 1].

    ``anchors`` are ``[B, C, H, W]`` images in [-1, 1]. Each candidate starts from its own x_T. With a list of
    generators (one per anchor) all randomness of anchor b (its x_T's, anchor noise, eta noise) comes from
    generator b, so an anchor's candidates do not depend on the other anchors in the batch. With
    ``share_anchor_pass`` an anchor's noised copy and encoder pass are shared by its candidates at every
    step (cheaper; METHOD.md draws fresh anchor noise per candidate). ``w`` and ``mix_depth`` are those of
    ``interpolated_noise_prediction``. On CUDA the model is converted to channels-last in place;
    ``precision`` "auto" means bf16 autocast on CUDA and on CPUs with bf16 units.
    """
    alpha_bar = alphas_cumprod(scheduler)
    _check_w(w)
    _check_sampling(unet, anchors, num_candidates, steps, eta, generator, len(alpha_bar))
    _check_mix_depth(unet, mix_depth)
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
    pairs = ddim_timestep_pairs(len(alpha_bar), steps)
    with eval_mode(unet), autocast(device, precision):
        for t, t_next in progress_bar(pairs, desc="DDIM", unit="step") if progress else pairs:
            ab_t = alpha_bar[t]
            anchor_t = (math.sqrt(ab_t) * anchors + math.sqrt(1 - ab_t) * noise(noise_rows)).flatten(0, 1)
            eps = interpolated_noise_prediction(unet, _layout(x), torch.tensor(t, device=device),
                                                _layout(anchor_t), w, mix_depth).float()
            x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
            if t_next < 0:
                x = x0
                break
            ab_next = alpha_bar[t_next]
            sigma = eta * math.sqrt((1 - ab_t / ab_next) * (1 - ab_next) / (1 - ab_t))
            x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next - sigma**2) * eps
            if sigma > 0:
                x = x + sigma * noise(k).flatten(0, 1)
    return x.clamp(-1, 1).reshape(batch, k, channels, height, width).contiguous()
