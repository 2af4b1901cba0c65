"""SimCLR (Chen et al. 2020): NT-Xent between two views, negatives from the whole global batch."""

from __future__ import annotations

from torch import Tensor, nn

from clsp.train.heads import simclr_projector
from clsp.train.losses import nt_xent
from clsp.train.methods.base import EncodedView, Method


class SimCLR(Method):
    name = "simclr"

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, forward_mode: str = "separate") -> None:
        projector = simclr_projector(backbone.feature_dim, proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        return {"loss_base": nt_xent(v1.z, v2.z, self.temperature)}
