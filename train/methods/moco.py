"""MoCo v2+ (solo-learn's "mocov2plus"): MoCo v2 with a symmetric loss.

A momentum copy of the backbone and projector gives the keys; a queue per view holds the gathered keys of
past batches as negatives. No predictor. For the CLSP term, ``z3`` is view 3 through the online (query)
network, like ``z1``: the momentum network gets no gradient, so the term could not act through it.

Beside ``z_std`` of the queries, ``key_std`` (the keys' spread), ``key_cos`` (a query's cosine with its own
key) and ``queue_cos`` (with the queue's keys) show a run near collapse: when the key network maps every
image alike, the positive and the negatives look the same and the loss has nothing to contrast.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.backbones import feature_dim
from clsp.train.collapse import std_of_l2_normalized
from clsp.train.heads import simclr_projector
from clsp.train.losses import moco_loss, positive_nce
from clsp.train.memory import FIFOQueue
from clsp.train.methods.base import EncodedView, Method, own, register
from clsp.train.recipes import ForwardMode, Recipe, ViewAugmentation


@register
class MoCo(Method):
    name = "moco"
    display_name = "MoCo"
    positive_losses = ("align", "infonce")
    metrics = ("key_std", "key_cos", "queue_cos")
    # CLSP-MoCo (the authors' code): batch 512, lr 0.3, two 32768-key queues, momentum 0.99 -> 0.999,
    # saturation 0.2, solarization, one backbone call per view. On CIFAR-100 CLSP-MoCo has lambda 0.2 and
    # probe lr 10; its baseline keeps 1.
    recipe = Recipe(batch_size=512, lr=0.3, optimizer="sgd", weight_decay=1e-4, weight_decay_scope="all",
                    clsp_lambda=0.5, probe_lr=1.0,
                    augmentation=ViewAugmentation(saturation=0.2, solarize_p=0.2), forward="separate",
                    schedule_unit="epoch", warmup_start_lr=1e-3,
                    # digits: lr 0.1 and 256-key queues, chosen on validation (README "Does CLSP help?"): at the
                    # default's lr 0.5 with 1,024 keys the baseline sits near collapse for its first epochs.
                    by_dataset={"cifar100": {"clsp_lambda": 0.2, "clsp_probe_lr": 10.0},
                                "digits": {"queue_size": 256, "lr": 0.1}})

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int,
                 queue_size: Annotated[int, own(32768, "keys per queue (one queue per view)", ge=1, le=1 << 24)],
                 momentum: Annotated[float, own(0.99, "momentum-encoder coefficient at the start", ge=0, le=1)],
                 momentum_end: Annotated[float, own(0.999, "coefficient at the end (cosine rise)", ge=0, le=1)],
                 forward_mode: ForwardMode = "separate") -> None:
        projector = simclr_projector(feature_dim(backbone), proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode, momentum=float(momentum), momentum_end=float(momentum_end))
        self.momentum_backbone = self.momentum_copy(backbone)
        self.momentum_projector = self.momentum_copy(projector)
        # queue1 holds keys of view 1 (negatives for view-2 queries), queue2 those of view 2.
        self.queue1 = FIFOQueue(queue_size, proj_output_dim)
        self.queue2 = FIFOQueue(queue_size, proj_output_dim)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)]

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        return F.normalize(self.momentum_projector(self.momentum_backbone(images)).float(), dim=-1)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        k1, k2 = self.keys(v1.images), self.keys(v2.images)
        negatives1, negatives2 = self.queue1.contents()[0], self.queue2.contents()[0]
        loss = (moco_loss(v1.z, k2, negatives2, self.temperature)
                + moco_loss(v2.z, k1, negatives1, self.temperature)) / 2
        self.queue1.push(k1)
        self.queue2.push(k2)
        with torch.no_grad():
            key_cos = ((v1.z * k2).sum(-1).mean() + (v2.z * k1).sum(-1).mean()) / 2
            queue_cos = ((v1.z @ negatives2.T).mean() + (v2.z @ negatives1.T).mean()) / 2
        return {"loss_base": loss, "key_std": std_of_l2_normalized(k1), "key_cos": key_cos, "queue_cos": queue_cos}

    def contrast(self, v1: EncodedView, v2: EncodedView, positive: Tensor) -> Tensor:
        """The positive (the synthetic view through the online network) against each query's queue of negatives."""
        negatives1, negatives2 = self.queue1.contents()[0], self.queue2.contents()[0]
        return (positive_nce(v1.z, positive, negatives2, temperature=self.temperature)
                + positive_nce(v2.z, positive, negatives1, temperature=self.temperature)) / 2
