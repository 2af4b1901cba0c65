"""Supervised contrastive learning (Khosla et al. 2020), as the authors' ``simclr_supervised`` runs it: the
two real views, every view of the global batch with the anchor's label a positive, temperature 0.2, their
SimCLR recipe otherwise. Their run has no CLSP term (``--clsp-lambda 0``); the recipe keeps SimCLR's lambda
1.0, so that a study pairs CLSP-SupCon with that baseline as it pairs every method."""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor, nn

from clsp.errors import UserError
from clsp.train.backbones import feature_dim
from clsp.train.heads import simclr_projector
from clsp.train.losses import supcon_loss
from clsp.train.methods.base import EncodedView, Method, register
from clsp.train.methods.simclr import SimCLR
from clsp.train.recipes import ForwardMode


@register
class SupCon(Method):
    name = "supcon"
    display_name = "SupCon"
    needs_labels = True
    # batch 1024, SGD lr 0.5, projector 512-4096-256, both views in one call; SimCLR's digits choice of
    # positive_loss is not SupCon's (it implements the authors' term only)
    recipe = replace(SimCLR.recipe, by_dataset={})

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, forward_mode: ForwardMode = "separate") -> None:
        projector = simclr_projector(feature_dim(backbone), proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        if labels is None:  # ``build_method`` refuses an unlabelled run before training
            raise UserError("--method supcon needs a class label for every training image")
        return {"loss_base": supcon_loss(v1.z, v2.z, labels, self.temperature)}
