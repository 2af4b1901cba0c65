"""The training recipes: every fact of a method, in one place (METHOD.md section 3).

SimCLR and MoCo follow the authors' released CLSP code (ResNet-18, CIFAR stem); the authors have no
NNCLR, whose reference recipe is solo-learn's. A recipe value is used wherever a run leaves the setting
unset; ``by_dataset`` holds the few facts that differ per dataset (CIFAR-100 MoCo's lambda and probe lr,
NNCLR's CIFAR-10 std).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["simclr", "moco", "nnclr"]
METHODS: tuple[str, ...] = ("simclr", "moco", "nnclr")
Stats = tuple[float, float, float]


@dataclass(frozen=True)
class ViewAugmentation:
    """One view's augmentation list: RandomResizedCrop, ColorJitter (p), grayscale, flip, solarization."""

    crop_min_scale: float = 0.08
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    flip: bool = True
    solarize_p: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """A method's training facts; every field is a default of the same-named training setting."""

    batch_size: int  # global, over all processes
    lr: float
    optimizer: Literal["sgd", "lars"]
    weight_decay: float
    weight_decay_scope: Literal["all", "weights"]  # "weights": biases and norm parameters are not decayed
    clsp_lambda: float
    probe_lr: float  # the linear probe's learning rate (METHOD.md section 4)
    augmentation: ViewAugmentation
    # joint: one backbone call on cat(x1, x2, x3); separate: one call per view (see ``Method.forward``)
    forward: Literal["joint", "separate"]
    schedule_unit: Literal["epoch", "step"]  # how often the warm-up and cosine schedule moves
    warmup_start_lr: float
    second_view: ViewAugmentation | None = None  # asymmetric methods: view 2's list (else the same as view 1)
    clsp_probe_lr: float | None = None  # the probe's rate for a run with the CLSP term, where it differs
    mean: Stats | None = None  # normalisation where the recipe's differs from the dataset's (clsp.datasets)
    std: Stats | None = None
    warmup_epochs: float = 10.0
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    pred_hidden_dim: int | None = None
    queue_size: int | None = None
    momentum: float | None = None
    momentum_end: float | None = None
    by_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """The recipe's settings for ``dataset`` as a flat mapping (dataset-specific values applied)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "by_dataset"}
        values.update(self.by_dataset.get(dataset, {}))
        return values


RECIPES: dict[str, Recipe] = {
    # CLSP-SimCLR: batch 1024, SGD lr 0.5, wd 1e-4 on all parameters, projector 512-4096-256 without BN, the
    # three views in one backbone call, warm-up from 1e-3 and cosine stepped once per epoch.
    "simclr": Recipe(batch_size=1024, lr=0.5, optimizer="sgd", weight_decay=1e-4, weight_decay_scope="all",
                     clsp_lambda=1.0, probe_lr=1.0, augmentation=ViewAugmentation(), forward="joint",
                     schedule_unit="epoch", warmup_start_lr=1e-3),
    # CLSP-MoCo: batch 512, lr 0.3, two 32768-key queues, momentum 0.99 -> 0.999, saturation 0.2, solarization,
    # one backbone call per view. On CIFAR-100 CLSP-MoCo has lambda 0.2 and probe lr 10; its baseline keeps 1.
    "moco": Recipe(batch_size=512, lr=0.3, optimizer="sgd", weight_decay=1e-4, weight_decay_scope="all",
                   clsp_lambda=0.5, probe_lr=1.0,
                   augmentation=ViewAugmentation(saturation=0.2, solarize_p=0.2), forward="separate",
                   schedule_unit="epoch", warmup_start_lr=1e-3,
                   queue_size=32768, momentum=0.99, momentum_end=0.999,
                   by_dataset={"cifar100": {"clsp_lambda": 0.2, "clsp_probe_lr": 10.0}}),
    # NNCLR as solo-learn: LARS, batch 256, lr 0.4, wd 1e-5 without biases and norms, BN projector 2048-2048-256,
    # predictor 4096, 65536 x 256 support set, asymmetric views (saturation 0.2 on both, solarization on the
    # second), warm-up from 3e-5 stepped per step, CIFAR-10 std of torchvision's statistics; lambda as SimCLR's.
    "nnclr": Recipe(batch_size=256, lr=0.4, optimizer="lars", weight_decay=1e-5, weight_decay_scope="weights",
                    clsp_lambda=1.0, probe_lr=1.0, augmentation=ViewAugmentation(saturation=0.2),
                    second_view=ViewAugmentation(saturation=0.2, solarize_p=0.2), forward="separate",
                    schedule_unit="step", warmup_start_lr=3e-5,
                    proj_hidden_dim=2048, pred_hidden_dim=4096, queue_size=65536,
                    by_dataset={"cifar10": {"std": (0.2470, 0.2435, 0.2616)}}),
}


def probe_lr(method: str, dataset: str, clsp_lambda: float) -> float:
    """The linear probe's learning rate for a run of ``method`` on ``dataset`` (METHOD.md section 4): a
    baseline (lambda 0) keeps the recipe's ``probe_lr`` where CLSP runs use another one."""
    values = RECIPES[method].for_dataset(dataset)
    return values["clsp_probe_lr"] if clsp_lambda > 0 and values["clsp_probe_lr"] else values["probe_lr"]


def normalisation(method: str, dataset: str, default: tuple[Stats, Stats]) -> tuple[Stats, Stats]:
    """The per-channel mean and std a run of ``method`` normalises ``dataset`` with: the recipe's where it
    names them, else ``default`` (the dataset's). Training records them in the encoder card, so evaluation
    normalises as training did."""
    values = RECIPES[method].for_dataset(dataset)
    return values["mean"] or default[0], values["std"] or default[1]
