"""What a training recipe is (METHOD.md section 3), and the lookup of a registered method's recipe.

Each method's recipe lives in its own file under ``clsp.train.methods`` (SimCLR and MoCo follow the
authors' released CLSP code, NNCLR solo-learn's). A recipe value is used wherever a run leaves the
setting unset; ``by_dataset`` holds the few facts that differ per dataset (CIFAR-100 MoCo's lambda and
probe lr, NNCLR's CIFAR-10 std). The choices a recipe and a training setting share are declared here once.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

Optimizer = Literal["sgd", "lars"]
DecayScope = Literal["all", "weights"]  # "weights": biases and norm parameters are not decayed
ForwardMode = Literal["joint", "separate"]
ScheduleUnit = Literal["epoch", "step"]
NNIndex = Literal["flat", "ivf", "hnsw"]
# How the synthetic positive enters the loss (``clsp.train.methods.base.Method.positive_term``): align is the
# authors' term, infonce the positive inside the method's own contrastive loss, nn (NNCLR) the positive's
# nearest neighbour in the support set as a positive.
PositiveLoss = Literal["align", "infonce", "nn"]
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
    """A method's training facts; every field is a default of the same-named training setting (a method's own
    settings bring their recipe value with their declaration, ``clsp.train.methods.base.own``)."""

    batch_size: int  # global, over all processes
    lr: float
    optimizer: Optimizer
    weight_decay: float
    weight_decay_scope: DecayScope
    clsp_lambda: float
    probe_lr: float  # the linear probe's learning rate (METHOD.md section 4)
    augmentation: ViewAugmentation
    # joint: one backbone call on cat(x1, x2, x3); separate: one call per view (see ``Method.forward``)
    forward: ForwardMode
    schedule_unit: ScheduleUnit  # how often the warm-up and cosine schedule moves
    warmup_start_lr: float
    second_view: ViewAugmentation | None = None  # asymmetric methods: view 2's list (else the same as view 1)
    clsp_probe_lr: float | None = None  # the probe's rate for a run with the CLSP term, where it differs
    mean: Stats | None = None  # normalisation where the recipe's differs from the dataset's (clsp.datasets)
    std: Stats | None = None
    warmup_epochs: float = 10.0
    temperature: float = 0.2
    proj_hidden_dim: int = 4096
    proj_output_dim: int = 256
    positive_loss: PositiveLoss = "align"
    by_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_dataset(self, dataset: str) -> dict[str, Any]:
        """The recipe's settings for ``dataset`` as a flat mapping (dataset-specific values applied)."""
        values = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "by_dataset"}
        values.update(self.by_dataset.get(dataset, {}))
        return values


class _Registry(MutableMapping[str, Recipe]):
    """Method name -> recipe, filled as methods register (``clsp.train.methods.base.register``). The built-in
    methods are imported on the first lookup, so a lookup never meets a registry not yet filled."""

    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] = {}

    @staticmethod
    def _load() -> None:
        import clsp.train.methods  # noqa: F401  (importing it registers every method file)

    def __getitem__(self, name: str) -> Recipe:
        self._load()
        return self._recipes[name]

    def __setitem__(self, name: str, recipe: Recipe) -> None:
        self._recipes[name] = recipe

    def __delitem__(self, name: str) -> None:
        del self._recipes[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(self._recipes)

    def __len__(self) -> int:
        self._load()
        return len(self._recipes)


RECIPES: MutableMapping[str, Recipe] = _Registry()


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
