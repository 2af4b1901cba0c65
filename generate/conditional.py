"""Class-conditional diffusion with classifier-free guidance (Ho and Salimans 2022), as the authors train and
sample it (METHOD.md section 2, "Class labels").

A conditional model is a diffusers ``UNet2DModel`` with ``num_class_embeds = num_classes + 1``: embedding 0 is
the null class, a dataset label y is embedding y + 1. Training replaces the whole batch's labels by the null
class with probability ``label_dropout`` (0.1), so one model predicts both eps(x, t, y) and eps(x, t, null);
sampling combines them as eps = (1 + w) * eps(x, t, y) - w * eps(x, t, null), w the guidance weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from clsp.errors import UserError

NULL_CLASS = 0
AUTHORS_GUIDANCE = 1.8  # their conditional CIFAR configs' w


def config_classes(config: Mapping[str, Any]) -> int:
    """The dataset classes a U-Net config is conditioned on (0: unconditional); refuses a class embedding other
    than the null-class table this module writes."""
    embeds = config.get("num_class_embeds")
    if config.get("class_embed_type") is not None or (embeds is not None and embeds < 2):
        raise UserError(f"the U-Net's class embedding (class_embed_type {config.get('class_embed_type')!r}, "
                        f"num_class_embeds {embeds!r}) is not a table of num_classes + 1 labels with 0 the null class; "
                        "train a conditional model with clsp ddpm train --conditional")
    return 0 if embeds is None else int(embeds) - 1


def num_classes(unet: Any) -> int:
    """How many dataset classes ``unet`` is conditioned on; 0 for an unconditional model."""
    return config_classes(unet.config)


def embedding_index(labels: Tensor) -> Tensor:
    """The class-embedding rows of dataset labels: y + 1, since row 0 is the null class."""
    return labels.long() + 1


def drop_labels(index: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """The whole batch's embedding indices replaced by the null class with ``probability`` (one draw per batch,
    as the authors' training does), else unchanged."""
    if torch.rand((), generator=generator).item() < probability:
        return torch.full_like(index, NULL_CLASS)
    return index


def guided(conditional: Tensor, unconditional: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: ``(1 + w) * eps(x, t, y) - w * eps(x, t, null)``; w = 0 is the conditional one."""
    return (1.0 + guidance) * conditional - guidance * unconditional


def check_guidance(classes: int, guidance: float | None, where: str = "the U-Net") -> None:
    """A guidance weight exactly where the model is class-conditional (``classes`` > 0)."""
    if guidance is not None and not classes:
        raise UserError(f"--guidance needs a class-conditional model, and {where} is unconditional; leave --guidance "
                        "out, or train one with clsp ddpm train --conditional")
    if guidance is None and classes:
        raise UserError(f"{where} is class-conditional ({classes} classes): pass --guidance W (0 = the conditional "
                        f"prediction alone; the authors use {AUTHORS_GUIDANCE})")
    if guidance is not None and not 0.0 <= guidance <= 100.0:
        raise UserError(f"--guidance must be in [0, 100], got {guidance}")


def check_labels(classes: int, labels: Tensor | None, rows: int) -> Tensor:
    """``labels``, checked to be one dataset label per anchor, each in [0, classes), for a conditional model."""
    if labels is None or labels.ndim != 1 or len(labels) != rows:
        raise UserError(f"a class-conditional model needs one class label per anchor ({rows}), got "
                        f"{None if labels is None else list(labels.shape)}; generate from a labelled dataset")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise UserError(f"the anchors' labels span {int(labels.min())}..{int(labels.max())} but the model knows "
                        f"{classes} classes (0..{classes - 1}); use a model trained on this dataset's labels")
    return labels
