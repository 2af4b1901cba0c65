"""The shared frame of every method: encode the views, add the CLSP term, train the online probe, move
the momentum copies, group parameters; and the registry of methods.

A method is one ``nn.Module`` whose ``forward`` is the whole training step's forward, so that the trainer
can call it through the DDP wrapper and gradients synchronise. A method is one file in this folder: a
subclass decorated with ``@register`` that names itself (``name``, ``display_name``), its ``recipe``, how the
two real views give its base loss (``base_loss``), the scalars it reports beside the loss (``metrics``), its
base loss at collapse where one is known (``loss_at_collapse``) and, if it has momentum copies, which
(``momentum_pairs``). A setting only some methods take is declared once, on the constructor's argument
(``Annotated[int, own(recipe value, help, constraints)]``): the training setting, its option, its recipe value
and its help come from there (``clsp.train.config``). Its online linear probe (a monitor of training, not the evaluation
probe of ``clsp-eval linear``) is part of the module, so it is checkpointed and resumed with it.

BatchNorm's running statistics are what evaluation normalises with, so synthetic images must not set them
(METHOD.md section 3): in the ``joint`` pass (the authors' SimCLR) they are the statistics of the
concatenated views, real ones two thirds of them; in the ``separate`` pass (their MoCo) the synthetic view
is normalised with its own batch statistics but leaves the running ones as the two real views set them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clsp.train.backbones import feature_dim
from clsp.train.collapse import std_of_l2_normalized
from clsp.train.losses import clsp_loss
from clsp.train.recipes import RECIPES, ForwardMode, PositiveLoss, Recipe
from clsp.train.schedules import cosine_momentum

ONLINE_PROBE_LR = 0.1  # the online probe only monitors training; the evaluation probe is clsp-eval linear
PROBE_MOMENTUM = 0.9
# the scalars ``Method.forward`` gives for every method (a method adds its own, ``Method.metrics``)
FRAME_METRICS = ("loss", "loss_base", "loss_clsp", "probe_acc", "z_std")


@dataclass(frozen=True)
class OwnSetting:
    """A training setting that only the methods declaring it take: its recipe value, help and constraints."""

    default: Any
    help: str
    constraints: dict[str, Any] = field(default_factory=dict)


def own(default: Any, help: str, **constraints: Any) -> OwnSetting:
    """Declare a method's own setting on its constructor argument: ``queue_size: Annotated[int, own(32768,
    "Keys per queue.", ge=1)]``; ``default`` is the recipe's value (``Recipe.by_dataset`` may change it)."""
    return OwnSetting(default, help, constraints)


def own_settings(cls: type[Method]) -> dict[str, tuple[Any, OwnSetting]]:
    """The settings ``cls``'s constructor declares with ``own``: name -> (type, declaration)."""
    declared: dict[str, tuple[Any, OwnSetting]] = {}
    for name, hint in get_type_hints(cls.__init__, include_extras=True).items():
        if get_origin(hint) is Annotated:
            kind, *extras = get_args(hint)
            for extra in extras:
                if isinstance(extra, OwnSetting):
                    declared[name] = (kind, extra)
    return declared


@dataclass
class EncodedView:
    """One view through the online network."""

    images: Tensor
    features: Tensor  # backbone output
    projection: Tensor  # projector output before normalisation, float32
    z: Tensor  # L2-normalised projection, float32
    prediction: Tensor | None = None  # a predictor's output, for methods with one (set once, on first use)


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


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online``, parameter by parameter."""
    torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), 1.0 - momentum)


class Method(nn.Module):
    """Base method with the CLSP term: ``L = L_base + clsp_lambda * L_positive``.

    ``positive_loss`` says what ``L_positive`` is (``positive_term``): ``align``, the authors' ``mean ||z1 -
    z3||^2`` on the normalised projector outputs (never a predictor's) of the anchor's first view and of the
    synthetic positive's view, both through the same online network with gradients in both; ``infonce``, the
    synthetic view as a second positive of both real views inside the method's own contrastive loss, against
    the same negatives (``contrast``; with negatives it cannot be minimised by collapse, unlike ``align``); a
    method may add its own (NNCLR's ``nn``). When ``x3`` is None or ``clsp_lambda`` is 0, view 3 is not
    forwarded at all, so the baseline costs exactly what the plain method costs.
    """

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # as the paper and the report write it ("SimCLR"); the name where unset
    recipe: ClassVar[Recipe]
    # the values of ``positive_loss`` the method implements; ``infonce`` needs ``contrast``
    positive_losses: ClassVar[tuple[PositiveLoss, ...]] = ("align",)
    # the base loss needs every training image's class label (``build_method`` refuses an unlabelled run)
    needs_labels: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()  # scalars of ``base_loss`` beside ``loss_base`` that are logged
    # scalars of ``positive_term`` beside ``loss_clsp``, given only by the positive losses that compute them
    positive_metrics: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def loss_at_collapse(cls, global_batch: int) -> float | None:
        """The base loss when every projection coincides, for the collapse warning; None where unknown."""
        return None

    @classmethod
    def logged_metrics(cls) -> tuple[str, ...]:
        """The scalars of a training step the trainer logs and averages per epoch."""
        return (*FRAME_METRICS, *cls.metrics, *cls.positive_metrics)

    def __init__(self, backbone: nn.Module, projector: nn.Module, *, clsp_lambda: float,
                 temperature: float, forward_mode: ForwardMode = "separate",
                 momentum: float | None = None, momentum_end: float | None = None) -> None:
        super().__init__()
        self.positive_loss: PositiveLoss = "align"  # set by ``use_positive_loss``
        self.backbone = backbone
        self.projector = projector
        self.clsp_lambda = float(clsp_lambda)
        self.temperature = float(temperature)
        self.forward_mode = forward_mode
        self.probe: nn.Linear | None = None
        # the EMA coefficient of the momentum copies rises from ``momentum`` to ``momentum_end`` (a method
        # with ``momentum_pairs`` takes both settings); ``self.momentum`` is the latest, for logging
        self.base_momentum, self.end_momentum = momentum, momentum_end
        self.momentum = momentum

    @staticmethod
    def momentum_copy(module: nn.Module) -> nn.Module:
        """A copy of ``module`` that follows it by EMA and gets no gradient."""
        return copy.deepcopy(module).requires_grad_(False)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online module, its momentum copy) pairs, moved by EMA after every optimiser step; none by default."""
        return []

    def attach_probe(self, num_classes: int) -> None:
        """Add the online linear probe on the backbone's features; trained on detached features, it
        monitors the representation without changing it."""
        self.probe = nn.Linear(feature_dim(self.backbone), num_classes)

    def probe_optimizer(self) -> torch.optim.Optimizer | None:
        """The probe's own optimiser: SGD at a constant rate, outside the encoder's warm-up and cosine schedule."""
        if self.probe is None:
            return None
        return torch.optim.SGD(self.probe.parameters(), lr=ONLINE_PROBE_LR, momentum=PROBE_MOMENTUM)

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

    def use_positive_loss(self, positive_loss: PositiveLoss) -> None:
        """Choose how the synthetic positive enters the loss (set after construction, so that a method's
        constructor takes only the settings of its own)."""
        if positive_loss not in self.positive_losses:
            raise ValueError(f"{self.name} implements positive_loss {', '.join(self.positive_losses)}, "
                             f"not {positive_loss!r}")
        self.positive_loss = positive_loss

    def contrast(self, v1: EncodedView, v2: EncodedView, positive: Tensor) -> Tensor:
        """The method's own contrastive loss with ``positive`` ([B, D], one row per anchor) as the positive of
        both real views, against the negatives the base loss gives those views (``positive_loss: infonce``)."""
        raise NotImplementedError

    def positive_term(self, v1: EncodedView, v2: EncodedView, v3: EncodedView,
                      labels: Tensor | None) -> dict[str, Tensor]:
        """``{"loss_clsp": L_positive, **metrics}``. Called before ``base_loss``, so that both see the same
        memory banks (``base_loss`` pushes the batch into them)."""
        if self.positive_loss == "infonce":
            return {"loss_clsp": self.contrast(v1, v2, v3.z)}
        return {"loss_clsp": clsp_loss(v1.z, v3.z)}

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor | None = None,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        """One training step's forward: ``{"loss", "loss_base", "loss_clsp", "features", ...metrics}``.

        ``features`` is ``backbone(x1)`` detached. With a probe and labels, ``loss_probe`` (its
        cross-entropy on those features, to be added to ``loss`` for the backward pass: it has no gradient
        into the encoder) and ``probe_acc`` come too. ``forward_mode`` says how the views meet BatchNorm
        (the module's docstring).
        """
        x3 = x3 if self.clsp_lambda > 0 else None  # the baseline forwards no view 3
        v3 = None
        if self.forward_mode == "joint":
            v1, v2, *rest = self.encode_joint([x1, x2] if x3 is None else [x1, x2, x3])
            v3 = rest[0] if rest else None
        else:
            v1, v2 = self.encode(x1), self.encode(x2)
            if x3 is not None:
                with running_stats_kept(self):
                    v3 = self.encode(x3)
        positive = {"loss_clsp": torch.zeros((), device=v1.z.device)} if v3 is None else \
            self.positive_term(v1, v2, v3, labels)
        out = {**self.base_loss(v1, v2, labels), **positive}
        out["loss"] = out["loss_base"] + self.clsp_lambda * out["loss_clsp"]
        out["features"] = v1.features.detach()
        out["z_std"] = std_of_l2_normalized(v1.z.detach())  # 0 at collapse (clsp.train.collapse)
        if self.probe is not None and labels is not None:
            logits = self.probe(out["features"].float())
            out["loss_probe"] = F.cross_entropy(logits, labels)
            out["probe_acc"] = (logits.detach().argmax(1) == labels).float().mean()
        return out

    def on_train_step_end(self, progress: float) -> None:
        """Called after each optimiser step with the fraction of training done (0 to 1): moves the momentum
        copies towards their online modules, with the coefficient for ``progress``."""
        pairs = self.momentum_pairs()
        if not pairs:
            return
        if self.base_momentum is None or self.end_momentum is None:
            raise TypeError(f"{type(self).__name__} has momentum pairs but no momentum and momentum_end")
        self.momentum = cosine_momentum(self.base_momentum, self.end_momentum, progress)
        for online, target in pairs:
            ema_update(target, online, self.momentum)

    def parameter_groups(self, weight_decay: float, scope: str = "all") -> list[dict]:
        """Trainable parameters in two groups. ``scope="all"`` (the authors' SGD recipes) decays every
        parameter; ``scope="weights"`` (solo-learn's LARS recipe) puts biases and norm-layer parameters
        (every 1-d parameter) in a group without weight decay, flagged ``lars_exclude`` so that LARS
        leaves their learning rate unadapted."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        probe = {id(param) for param in self.probe.parameters()} if self.probe is not None else set()
        for param in self.parameters():
            if param.requires_grad and id(param) not in probe:  # the probe has its own optimiser
                (no_decay if scope == "weights" and param.ndim <= 1 else decay).append(param)
        groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay, "lars_exclude": False},
                  {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
        return [group for group in groups if group["params"]]


M = TypeVar("M", bound=type[Method])
REGISTRY: dict[str, type[Method]] = {}


def register(cls: M) -> M:
    """Class decorator: make ``cls`` a method that ``--method cls.name`` selects, with its recipe."""
    if not cls.name or not getattr(cls, "recipe", None):
        raise TypeError(f"{cls.__name__} needs a name and a recipe to be registered")
    if REGISTRY.get(cls.name, cls) is not cls:
        raise ValueError(f"method {cls.name!r} is registered already (by {REGISTRY[cls.name].__name__})")
    REGISTRY[cls.name] = cls
    RECIPES[cls.name] = cls.recipe
    return cls
