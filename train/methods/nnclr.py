"""NNCLR (Dwibedi et al. 2021), following solo-learn's implementation.

The positive of a view is the nearest neighbour of its projection in a support set (a FIFO of past view-1
projections, gathered over ranks), contrasted with the other view's predictor output; the loss is made
symmetric. For the CLSP term, ``z1`` and ``z3`` are normalised projections (not predictor outputs): the
support set is made of projections, so the synthetic positive is pulled towards the anchor in the space
where neighbours are searched.

``align`` pulls view 1, whose projections fill the support set, onto a positive that may show another
class, and later neighbours are searched among those projections. ``infonce`` puts the synthetic
projection where the neighbour stands in NNCLR's loss, against the other predictions of the batch; ``nn``
puts there the synthetic view's own nearest neighbour in the support set: a real embedding close to the
hard positive, which brings the positive in through the lookup itself without writing it into the set.
``nn_acc`` (the share of view-1 neighbours with the anchor's label) shows what the positives do to the
support set; ``nn_acc_synthetic`` the same for the synthetic view's neighbours (``nn``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from torch import Tensor, nn

from clsp.train.backbones import feature_dim
from clsp.train.heads import nnclr_predictor, nnclr_projector
from clsp.train.losses import nnclr_loss
from clsp.train.memory import SupportSet
from clsp.train.methods.base import EncodedView, Method, own, register
from clsp.train.recipes import ForwardMode, NNIndex, Recipe, ViewAugmentation


@register
class NNCLR(Method):
    name = "nnclr"
    display_name = "NNCLR"
    positive_losses = ("align", "infonce", "nn")
    # how often a neighbour in the support set has the anchor's label: view 1's, and (nn) the synthetic view's
    metrics = ("nn_acc",)
    positive_metrics = ("nn_acc_synthetic",)
    # solo-learn's NNCLR: LARS, batch 256, lr 0.4, wd 1e-5 without biases and norms, BN projector
    # 2048-2048-256, predictor 4096, 65536 x 256 support set searched exactly, asymmetric views (saturation
    # 0.2 on both, solarization on the second), warm-up from 3e-5 stepped per step, CIFAR-10 std of
    # torchvision's statistics; lambda as SimCLR's.
    recipe = Recipe(batch_size=256, lr=0.4, optimizer="lars", weight_decay=1e-5, weight_decay_scope="weights",
                    clsp_lambda=1.0, probe_lr=1.0, augmentation=ViewAugmentation(saturation=0.2),
                    second_view=ViewAugmentation(saturation=0.2, solarize_p=0.2), forward="separate",
                    schedule_unit="step", warmup_start_lr=3e-5,
                    proj_hidden_dim=2048,
                    # digits: infonce chosen on validation (README "Does CLSP help?"); a support set no larger
                    # than the 1,150 training anchors holds real embeddings after one epoch; 65536 random vectors
                    # would be the neighbours for the whole short run.
                    by_dataset={"cifar10": {"std": (0.2470, 0.2435, 0.2616)},
                                "digits": {"queue_size": 1024, "positive_loss": "infonce", "lr": 0.5}})

    def __init__(self, backbone: nn.Module, *, clsp_lambda: float, temperature: float, proj_hidden_dim: int,
                 proj_output_dim: int,
                 pred_hidden_dim: Annotated[int, own(4096, "predictor hidden size", ge=1, le=65536)],
                 queue_size: Annotated[int, own(65536, "support-set size", ge=1, le=1 << 24)],
                 nn_index: Annotated[NNIndex, own("flat", "support-set search: flat (exact) or approximate")],
                 forward_mode: ForwardMode = "separate") -> None:
        projector = nnclr_projector(feature_dim(backbone), proj_hidden_dim, proj_output_dim)
        super().__init__(backbone, projector, clsp_lambda=clsp_lambda, temperature=temperature,
                         forward_mode=forward_mode)
        self.predictor = nnclr_predictor(proj_output_dim, pred_hidden_dim)
        self.support_set = SupportSet(queue_size, proj_output_dim, index=nn_index)

    def predict(self, view: EncodedView) -> Tensor:
        """The view's predictor output, computed once per step however many terms use it."""
        if view.prediction is None:
            view.prediction = self.predictor(view.projection)
        return view.prediction

    def contrast(self, v1: EncodedView, v2: EncodedView, positive: Tensor) -> Tensor:
        """``positive`` in the neighbour's place of NNCLR's loss, against each view's batch of predictions."""
        return (nnclr_loss(positive, self.predict(v2), self.temperature)
                + nnclr_loss(positive, self.predict(v1), self.temperature)) / 2

    def positive_term(self, v1: EncodedView, v2: EncodedView, v3: EncodedView,
                      labels: Tensor | None) -> dict[str, Tensor]:
        if self.positive_loss != "nn":
            return super().positive_term(v1, v2, v3, labels)
        neighbours, neighbour_labels = self.support_set.nearest(v3.z.detach())
        out = {"loss_clsp": self.contrast(v1, v2, neighbours)}
        if labels is not None:
            out["nn_acc_synthetic"] = (neighbour_labels == labels.to(neighbour_labels.device)).float().mean()
        return out

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        p1, p2 = self.predict(v1), self.predict(v2)
        b = v1.z.shape[0]
        neighbours, neighbour_labels = self.support_set.nearest(torch.cat([v1.z, v2.z]).detach())
        nn1, nn2 = neighbours[:b], neighbours[b:]
        loss = (nnclr_loss(nn1, p2, self.temperature) + nnclr_loss(nn2, p1, self.temperature)) / 2
        out = {"loss_base": loss}
        if labels is not None:  # random initial entries have label -1, so they count as misses
            out["nn_acc"] = (neighbour_labels[:b] == labels.to(neighbour_labels.device)).float().mean()
        self.support_set.push(v1.z, labels)
        return out
