"""The U-Net split of METHOD.md section 2: encoder E (to the bottleneck), decoder D, and their interpolated use.

The split runs a diffusers ``UNet2DModel``'s own modules in the order of ``UNet2DModel.forward`` as diffusers
0.42.1 writes it (``diffusers/models/unets/unet_2d.py``, transcribed from and tested with that version;
``pyproject.toml`` admits other 0.x releases, and the test of w = 1 against ``unet(sample, t)`` over every block
type is what catches a release that changes it): the encoder
(input centring, time embedding, ``conv_in``, ``down_blocks``, ``mid_block``) and the decoder (``up_blocks``,
``conv_norm_out``, ``conv_act``, ``conv_out``). An interpolated noise prediction runs the encoder once on the
current samples and the noised anchors stacked into one batch and the decoder once on the mixed bottleneck
(and, with ``mix_depth``, the deepest skips), so it costs one encoder pass more than a plain one. A
class-conditional model's label joins the time embedding, as in its own forward; guidance doubles the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DModel

from clsp.errors import UserError
from clsp.generate.conditional import NULL_CLASS, guided, num_classes


def check_splittable(unet: torch.nn.Module) -> None:
    """The split into E and D runs a diffusers ``UNet2DModel``'s own modules; a class-conditional one needs the
    null-class embedding of ``clsp.generate.conditional``."""
    if not isinstance(unet, UNet2DModel):
        raise UserError(f"interpolated sampling needs a diffusers UNet2DModel, got {type(unet).__name__}; "
                        "load the diffusion model with UNet2DModel.from_pretrained")
    num_classes(unet)


def check_w(w: float) -> None:
    if not 0.0 <= w <= 1.0:
        raise UserError(f"w must be in [0, 1] (1 = plain sampling, 0 = anchor bottleneck only), got {w}")


def num_skips(unet: UNet2DModel) -> int:
    """How many skip connections the decoder consumes: the largest useful ``mix_depth``."""
    return sum(len(block.resnets) for block in unet.up_blocks)


def check_mix_depth(unet: UNet2DModel, mix_depth: int) -> None:
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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Sampling needs eval mode (the DDPM U-Nets use dropout); the caller's mode is restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def time_embedding(unet: UNet2DModel, timestep: torch.Tensor | int, sample: torch.Tensor,
                   class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps broadcast to the batch and their embedding, exactly as ``UNet2DModel.forward`` makes them: a
    class-conditional model adds the embedding of ``class_labels`` (its own indices, 0 the null class)."""
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
    elif timesteps.ndim == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
    if unet.class_embedding is not None:
        if class_labels is None or class_labels.shape != (sample.shape[0],):
            raise UserError(f"a class-conditional U-Net needs one class label per sample ({sample.shape[0]}), got "
                            f"{None if class_labels is None else list(class_labels.shape)}")
        emb = emb + unet.class_embedding(class_labels.to(emb.device)).to(dtype=unet.dtype)
    elif class_labels is not None:
        raise UserError("class labels were given for an unconditional U-Net; pass none")
    return timesteps, emb


def encode(unet: UNet2DModel, sample: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """E(x, t): the bottleneck (mid-block output) and the residuals the decoder consumes.

    ``sample`` is the model's input as a scheduler gives it: a ``center_input_sample`` model centres it here,
    as its own forward does, so every caller of E feeds the same images."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
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


def decode(unet: UNet2DModel, sample: torch.Tensor, residuals: tuple[torch.Tensor, ...], emb: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """D(h, skips, t): the model's output (the noise prediction) from a bottleneck and the skips."""
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
                                  anchor_sample: torch.Tensor, w: float, mix_depth: int = 0,
                                  class_labels: torch.Tensor | None = None, guidance: float = 0.0) -> torch.Tensor:
    """eps = D(w * h + (1 - w) * h_a, skips, t) with ``h``/``h_a`` the bottlenecks of ``sample``/``anchor_sample``.

    ``mix_depth`` d > 0 also mixes the d deepest skips (the first the decoder consumes) with the same w, the
    anchor's from its own encoder pass, since with the bottleneck alone the decoder still draws much of the
    class from the sample's skips; only skips at the bottleneck's resolution help (README, Stage 1). At 0 the
    skips come from ``sample`` alone (METHOD.md section 2). Both encoder passes run as one batched call.
    ``anchor_sample`` may have fewer rows than ``sample``: each anchor row then serves
    ``len(sample) // len(anchor_sample)`` consecutive samples (one encoder pass shared by an anchor's
    candidates). At w = 1 the anchor cannot change the result, so its pass is skipped and the output is exactly
    ``unet(sample, timestep).sample``.

    A class-conditional model takes ``class_labels`` (its embedding indices, one per sample row; an anchor's
    encoder pass uses its candidates' label) and, with ``guidance`` w > 0, gives the guided
    ``(1 + w) * eps(y) - w * eps(null)`` of two such predictions, run as one batch of twice the rows.
    """
    check_splittable(unet)
    check_w(w)
    check_mix_depth(unet, mix_depth)
    _check_inputs(unet, sample, anchor_sample)
    if guidance:
        if class_labels is None:
            raise UserError("guidance needs the class labels of a class-conditional U-Net")
        both = _interpolated(unet, sample.repeat(2, 1, 1, 1), timestep, anchor_sample.repeat(2, 1, 1, 1), w,
                             mix_depth, torch.cat([class_labels, torch.full_like(class_labels, NULL_CLASS)]))
        conditional, unconditional = both.chunk(2)
        return guided(conditional, unconditional, guidance)
    return _interpolated(unet, sample, timestep, anchor_sample, w, mix_depth, class_labels)


def _interpolated(unet: UNet2DModel, sample: torch.Tensor, timestep: torch.Tensor | int, anchor_sample: torch.Tensor,
                  w: float, mix_depth: int, class_labels: torch.Tensor | None) -> torch.Tensor:
    """``interpolated_noise_prediction`` without guidance, on checked inputs."""
    timesteps, emb = time_embedding(unet, timestep, sample, class_labels)
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
    return decode(unet, bottleneck, residuals, emb, timesteps)
