"""SimCLR (Chen et al. 2020): NT-Xent between two views, negatives from the whole global batch."""

from __future__ import annotations

from torch import Tensor, nn

from clsp.train.backbones import feature_dim
from clsp.train.collapse import nt_xent_at_collapse
from clsp.train.heads import simclr_projector
from clsp.train.losses import nt_xent, simclr_positive_nce
from clsp.train.methods.base import EncodedView, Method, register
from clsp.train.recipes import ForwardMode, Recipe, ViewAugmentation


@register
class SimCLR(Method):
    name = "simclr"
    display_name = "SimCLR"
    positive_losses = ("align", "infonce")
    # CLSP-SimCLR (the authors' code): batch 1024, SGD lr 0.5, wd 1e-4 on all parameters, projector
    # 512-4096-256 without BN, the three views in one backbone call, warm-up from 1e-3 and cosine stepped
    # once per epoch.
    recipe = Recipe(batch_size=1024, lr=0.5, optimizer="sgd", weight_decay=1e-4, weight_decay_scope="all",
                    clsp_lambda=1.0, probe_lr=1.0, augmentation=ViewAugmentation(), forward="joint",
                    schedule_unit="epoch", warmup_start_lr=1e-3,
                    # digits: the positive inside NT-Xent, chosen on validation (README "Does CLSP help?")
                    by_dataset={"digits": {"positive_loss": "infonce"}})

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int, forward_mode: ForwardMode = "separate") -> None:
        projector = simclr_projector(feature_dim(backbone), proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)

    @classmethod
    def loss_at_collapse(cls, global_batch: int) -> float | None:
        return nt_xent_at_collapse(global_batch)

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        return {"loss_base": nt_xent(v1.z, v2.z, self.temperature)}

    def contrast(self, v1: EncodedView, v2: EncodedView, positive: Tensor) -> Tensor:
        return simclr_positive_nce(v1.z, v2.z, positive, self.temperature)
