"""Optimisers and the learning-rate schedule of METHOD.md.

SGD with momentum 0.9 (SimCLR, MoCo) or LARS (solo-learn's NNCLR), and the schedule: linear warm-up
from the recipe's start rate (1e-3 for the SGD recipes, solo-learn's 3e-5 for NNCLR) to the base rate,
then cosine to 0. The authors' scripts move it once per epoch (METHOD.md section 3: peak at epoch 9 of
10 warm-up epochs), solo-learn once per step. LARS is timm's, set as solo-learn sets it (trust
coefficient 0.02, clipped); parameter groups without weight decay (biases, norm layers) keep an
unadapted rate, as solo-learn's ``exclude_bias_n_norm`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import get_args

import torch
from torch.optim.lr_scheduler import LambdaLR

from clsp.errors import UserError
from clsp.train.recipes import Optimizer

OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
MOMENTUM = 0.9
WARMUP_START_LR = 1e-3
LARS_TRUST_COEFF = 0.02


def build_optimizer(name: str, param_groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """SGD or LARS over groups that each carry their own ``weight_decay``."""
    if name == "sgd":
        # foreach (here and for LARS): each step of the update one kernel for all parameters, not one per parameter
        return torch.optim.SGD(param_groups, lr=lr, momentum=MOMENTUM, foreach=True)
    if name == "lars":
        from timm.optim import Lars

        return Lars(param_groups, lr=lr, momentum=MOMENTUM, trust_coeff=LARS_TRUST_COEFF, trust_clip=True, foreach=True)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")


def _ramp_then_cosine(t: int, *, base_lr: float, start_lr: float, ramp: int, peak_at: int, total: int) -> float:
    """Linear from ``start_lr`` (a fraction of ``base_lr``) at 0 to 1 at ``peak_at`` for ``t < ramp``, then a
    half cosine from 1 at ``ramp`` to 0 at ``total``."""
    if t < ramp:
        start = min(start_lr, base_lr) / base_lr if base_lr > 0 else 1.0
        return start + (1.0 - start) * t / peak_at if peak_at > 0 else 1.0
    span = max(1, total - ramp)
    return 0.5 * (1.0 + math.cos(math.pi * min(t - ramp, span) / span))


def warmup_cosine_factor(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                         start_lr: float = WARMUP_START_LR) -> float:
    """The multiplier of ``base_lr`` at ``step``: linear from ``start_lr`` over the warm-up, then cosine to 0."""
    return _ramp_then_cosine(step, base_lr=base_lr, start_lr=start_lr, ramp=warmup_steps, peak_at=warmup_steps,
                             total=total_steps)


def epoch_warmup_cosine_factor(epoch: int, *, base_lr: float, warmup_epochs: int, total_epochs: int,
                               start_lr: float = WARMUP_START_LR) -> float:
    """The multiplier of ``base_lr`` in ``epoch`` when the schedule moves once per epoch, as the authors' scripts
    step theirs: epochs 0 .. warmup-1 rise linearly from ``start_lr`` to the peak (reached in the last warm-up
    epoch), then epochs warmup .. total-1 follow the cosine from the peak towards 0."""
    return _ramp_then_cosine(epoch, base_lr=base_lr, start_lr=start_lr, ramp=warmup_epochs,
                             peak_at=warmup_epochs - 1, total=total_epochs)


def _by_epoch(step: int, steps_per_epoch: int, epoch_factor: Callable[[int], float]) -> float:
    return epoch_factor(step // steps_per_epoch)


def warmup_cosine(optimizer: torch.optim.Optimizer, *, unit: str, warmup_epochs: float, epochs: int,
                  steps_per_epoch: int, start_lr: float) -> LambdaLR:
    """The warm-up and cosine schedule, moved per ``unit`` ("epoch" or "step"; whole warm-up epochs in the
    epoch unit). Call ``step()`` after each optimiser step either way: in the epoch unit the rate changes at
    epoch boundaries only, so a run resumed mid-epoch continues on the same values. Its state dict holds plain
    values."""
    base = optimizer.param_groups[0]["lr"]
    if unit == "epoch":
        per_epoch = partial(epoch_warmup_cosine_factor, base_lr=base, warmup_epochs=min(epochs, round(warmup_epochs)),
                            total_epochs=epochs, start_lr=start_lr)
        return LambdaLR(optimizer, partial(_by_epoch, steps_per_epoch=steps_per_epoch, epoch_factor=per_epoch))
    if unit == "step":
        total = steps_per_epoch * epochs
        return LambdaLR(optimizer, partial(warmup_cosine_factor, base_lr=base, start_lr=start_lr, total_steps=total,
                                           warmup_steps=min(total, round(warmup_epochs * steps_per_epoch))))
    raise UserError(f"unknown schedule unit {unit!r}; choose epoch or step")
