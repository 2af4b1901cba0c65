"""Optimisers and the learning-rate schedule of METHOD.md.

SGD with momentum 0.9 (SimCLR, MoCo) or LARS (solo-learn's NNCLR), and a per-step schedule:
linear warm-up from 1e-3 to the base rate, then cosine to 0. LARS is timm's, set as solo-learn sets
it (trust coefficient 0.02, clipped); parameter groups without weight decay (biases, norm layers)
keep an unadapted rate, as solo-learn's ``exclude_bias_n_norm`` does.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from clsp.errors import UserError

OPTIMIZERS = ("sgd", "lars")
MOMENTUM = 0.9
WARMUP_START_LR = 1e-3
LARS_TRUST_COEFF = 0.02


def build_optimizer(name: str, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD or LARS over groups that each carry their own ``weight_decay``."""
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=MOMENTUM)
    if name == "lars":
        from timm.optim import Lars

        return Lars(param_groups, lr=lr, momentum=MOMENTUM, trust_coeff=LARS_TRUST_COEFF, trust_clip=True)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def warmup_cosine_factor(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                         start_lr: float = WARMUP_START_LR) -> float:
    """The multiplier of ``base_lr`` at ``step``: linear from ``start_lr`` over the warm-up, then cosine to 0."""
    if step < warmup_steps:
        start = min(start_lr, base_lr) / base_lr if base_lr > 0 else 1.0
        return start + (1.0 - start) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per-step scheduler (call ``step()`` after each optimiser step); its state dict holds plain values."""
    base = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, partial(warmup_cosine_factor, base_lr=base, warmup_steps=warmup_steps,
                                       total_steps=total_steps))
