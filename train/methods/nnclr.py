"""NNCLR (Dwibedi et al. 2021), following solo-learn's implementation.

The positive of a view is the nearest neighbour of its projection in a support set (a FIFO of past view-1
projections, gathered over ranks), contrasted with the other view's predictor output; the loss is made
symmetric. For the CLSP term, ``z1`` and ``z3`` are normalised projections (not predictor outputs): the
support set is made of projections, so the synthetic positive is pulled towards the anchor in the space
where neighbours are searched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clsp.train.heads import nnclr_predictor, nnclr_projector
from clsp.train.losses import nnclr_loss
from clsp.train.memory import SupportSet
from clsp.train.methods.base import EncodedView, Method


class NNCLR(Method):
    name = "nnclr"

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, pred_hidden_dim: int, queue_size: int, nn_index: str,
                 forward_mode: str = "separate") -> None:
        projector = nnclr_projector(backbone.feature_dim, proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)
        self.predictor = nnclr_predictor(proj_output_dim, pred_hidden_dim)
        self.support_set = SupportSet(queue_size, proj_output_dim, index=nn_index)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        p1, p2 = self.predictor(v1.projection), self.predictor(v2.projection)
        b = v1.z.shape[0]
        neighbours, neighbour_labels = self.support_set.nearest(torch.cat([v1.z, v2.z]).detach())
        nn1, nn2 = neighbours[:b], neighbours[b:]
        loss = (nnclr_loss(nn1, p2, self.temperature) + nnclr_loss(nn2, p1, self.temperature)) / 2
        out = {"loss_base": loss}
        if labels is not None:  # random initial entries have label -1, so they count as misses
            out["nn_acc"] = (neighbour_labels[:b] == labels.to(neighbour_labels.device)).float().mean()
        self.support_set.push(v1.z, labels)
        return out
