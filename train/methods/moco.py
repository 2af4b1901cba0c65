"""MoCo v2+ (solo-learn's "mocov2plus"): MoCo v2 with a symmetric loss.

A momentum copy of the backbone and projector gives the keys; a queue per view holds the gathered keys of
past batches as negatives. No predictor. For the CLSP term, ``z3`` is view 3 through the online (query)
network, like ``z1``: the momentum network gets no gradient, so the term could not act through it.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.heads import simclr_projector
from clsp.train.losses import moco_loss
from clsp.train.memory import FIFOQueue
from clsp.train.methods.base import EncodedView, Method


def cosine_momentum(base: float, end: float, progress: float) -> float:
    """EMA coefficient rising from ``base`` at the start to ``end`` at the end along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


class MoCo(Method):
    name = "moco"

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, queue_size: int, momentum: float, momentum_end: float,
                 forward_mode: str = "separate") -> None:
        projector = simclr_projector(backbone.feature_dim, proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(projector).requires_grad_(False)
        self.base_momentum, self.end_momentum = float(momentum), float(momentum_end)
        self.momentum = self.base_momentum  # the coefficient of the latest update, for logging
        # queue1 holds keys of view 1 (negatives for view-2 queries), queue2 those of view 2.
        self.queue1 = FIFOQueue(queue_size, proj_output_dim)
        self.queue2 = FIFOQueue(queue_size, proj_output_dim)

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(images)).float(), dim=-1)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        k1, k2 = self.keys(v1.images), self.keys(v2.images)
        # Clones: the queues are overwritten below, before autograd uses them in the backward pass.
        negatives1, negatives2 = self.queue1.contents()[0].clone(), self.queue2.contents()[0].clone()
        loss = (moco_loss(v1.z, k2, negatives2, self.temperature)
                + moco_loss(v2.z, k1, negatives1, self.temperature)) / 2
        self.queue1.push(k1)
        self.queue2.push(k2)
        return {"loss_base": loss}

    def on_train_step_end(self, progress: float) -> None:
        """Move the momentum network towards the online one, with the coefficient for ``progress``."""
        self.momentum = cosine_momentum(self.base_momentum, self.end_momentum, progress)
        ema_update(self.momentum_backbone, self.backbone, self.momentum)
        ema_update(self.momentum_projector, self.projector, self.momentum)
