"""The shared frame of every method: encode the views, add the CLSP term, group parameters.

A method is one ``nn.Module`` whose ``forward`` is the whole training step's forward, so that the trainer
can call it through the DDP wrapper and gradients synchronise. Subclasses only say how the two real views
give the base loss (``base_loss``) and what happens after the optimiser step (``on_train_step_end``).

BatchNorm's running statistics are what evaluation normalises with, so synthetic images must not set them
(METHOD.md section 3): in the ``joint`` pass (the authors' SimCLR) they are the statistics of the
concatenated views, real ones two thirds of them; in the ``separate`` pass (their MoCo) the synthetic view
is normalised with its own batch statistics but leaves the running ones as the two real views set them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.collapse import std_of_l2_normalized
from clsp.train.losses import clsp_loss


@dataclass
class EncodedView:
    """One view through the online network."""

    images: Tensor
    features: Tensor  # backbone output
    projection: Tensor  # projector output before normalisation, float32
    z: Tensor  # L2-normalised projection, float32


@contextmanager
def running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Inside, ``module``'s BatchNorm layers normalise with the batch's statistics (as in training) but leave
    their running statistics and batch count as they are: a layer that does not track running statistics
    uses and updates none, which is the same computation minus the update."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class Method(nn.Module):
    """Base method with the CLSP term ``L = L_base + clsp_lambda * mean ||z1 - z3||^2``.

    ``z1`` and ``z3`` are the normalised projector outputs (never a predictor's) of the anchor's first view
    and of the synthetic positive's view, both through the same online network with gradients in both.
    When ``x3`` is None or ``clsp_lambda`` is 0, view 3 is not forwarded at all, so the baseline costs
    exactly what the plain method costs.
    """

    name: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, projector: nn.Module, *, clsp_lambda: float,
                 temperature: float, forward_mode: Literal["joint", "separate"] = "separate") -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.clsp_lambda = float(clsp_lambda)
        self.temperature = float(temperature)
        self.forward_mode = forward_mode

    def encode(self, images: Tensor) -> EncodedView:
        features = self.backbone(images)
        projection = self.projector(features).float()
        return EncodedView(images, features, projection, F.normalize(projection, dim=-1))

    def encode_joint(self, views: list[Tensor]) -> list[EncodedView]:
        """The views through one call on their concatenation, split back per view."""
        encoded = self.encode(torch.cat(views))
        sizes = [len(view) for view in views]
        return [EncodedView(images, *parts) for images, *parts in
                zip(views, *(t.split(sizes) for t in (encoded.features, encoded.projection, encoded.z)))]

    def base_loss(self, v1: EncodedView, v2: EncodedView, labels: Tensor | None) -> dict[str, Tensor]:
        """The method's own loss on the two real views as ``{"loss_base": ..., **metrics}``; may update
        the method's memory banks."""
        raise NotImplementedError

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        """One training step's forward: ``{"loss", "loss_base", "loss_clsp", "features", ...metrics}``.

        ``features`` is ``backbone(x1)`` detached, for an online linear probe. ``forward_mode`` says how the
        views meet BatchNorm (the module's docstring).
        """
        synthetic = x3 is not None and self.clsp_lambda > 0
        v3 = None
        if self.forward_mode == "joint":
            v1, v2, *rest = self.encode_joint([x1, x2, x3] if synthetic else [x1, x2])
            v3 = rest[0] if synthetic else None
        else:
            v1, v2 = self.encode(x1), self.encode(x2)
        out = self.base_loss(v1, v2, labels)
        if synthetic:
            if v3 is None:
                with running_stats_kept(self):
                    v3 = self.encode(x3)
            loss_clsp = clsp_loss(v1.z, v3.z)
        else:
            loss_clsp = torch.zeros((), device=v1.z.device)
        out["loss_clsp"] = loss_clsp
        out["loss"] = out["loss_base"] + self.clsp_lambda * loss_clsp
        out["features"] = v1.features.detach()
        out["z_std"] = std_of_l2_normalized(v1.z.detach())  # 0 at collapse (clsp.train.collapse)
        return out

    def on_train_step_end(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done (0 to 1)."""

    def parameter_groups(self, weight_decay: float, scope: str = "all") -> list[dict]:
        """Trainable parameters in two groups. ``scope="all"`` (the authors' SGD recipes) decays every
        parameter; ``scope="weights"`` (solo-learn's LARS recipe) puts biases and norm-layer parameters
        (every 1-d parameter) in a group without weight decay, flagged ``lars_exclude`` so that LARS
        leaves their learning rate unadapted."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (no_decay if scope == "weights" and param.ndim <= 1 else decay).append(param)
        groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay, "lars_exclude": False},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return [group for group in groups if group["params"]]
