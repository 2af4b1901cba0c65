"""The one conversion between stored images (uint8, channels last) and the tensors the models take."""

from __future__ import annotations

import numpy as np
import torch

from clsp.errors import UserError


def to_float(images: np.ndarray | torch.Tensor, *, signed: bool) -> torch.Tensor:
    """uint8 ``[..., H, W, C]`` -> float32 ``[..., C, H, W]``, in [-1, 1] (``signed``: what the diffusion
    model takes) or in [0, 1] (what normalisation for an encoder starts from)."""
    tensor = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    x = tensor.movedim(-1, -3).float()
    return x / 127.5 - 1.0 if signed else x / 255.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[..., C, H, W]`` in [-1, 1] -> uint8 ``[..., H, W, C]`` (clipped and rounded). Images that are not
    finite are refused: NaN would be stored as black pixels that every later check accepts."""
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise UserError(f"the diffusion model produced {bad} NaN or infinite values in a batch of {images.numel()}: "
                        "its weights or numerics are broken (NaN or huge weights, a bf16 overflow); check the model, "
                        "or sample in fp32")
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
