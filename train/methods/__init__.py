"""The contrastive methods, each with the CLSP term: ``build_method(job, backbone)``.

Every module in this folder is imported here, and each registers its method (``base.register``), so
adding a method is adding one file; a method defined elsewhere registers the same way before the run's
settings are validated.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import cast

from torch import nn

from clsp.config import required
from clsp.errors import UserError
from clsp.train.config import TrainJob
from clsp.train.methods.base import REGISTRY, EncodedView, Method, register

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS: tuple[str, ...] = tuple(REGISTRY)  # the methods of this folder


def registered() -> tuple[str, ...]:
    """The names ``--method`` accepts: this folder's methods and any registered since."""
    return tuple(REGISTRY)


def method_only_settings() -> dict[str, tuple[str, ...]]:
    """Training setting -> the methods that take it, for the settings some methods do not take."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, cls in REGISTRY.items():
        for setting in cls.settings:
            owners[setting] = (*owners.get(setting, ()), name)
    return owners


def build_method(job: TrainJob, backbone: nn.Module, num_classes: int = 0) -> Method:
    """The method of a resolved ``job`` (``TrainJob.resolved``) on ``backbone`` (which needs ``.feature_dim``),
    with an online linear probe over ``num_classes`` classes when there are any (a method that needs labels
    is refused without)."""
    cls = REGISTRY[job.method]
    if cls.needs_labels and not num_classes:
        raise UserError(f"--method {job.method} needs a class label for every training image, and this dataset "
                        "has none; train on a labelled dataset or choose --method simclr")
    # a registered method is built from (backbone, *, the common settings below, its own ``settings``), not
    # from Method's own (backbone, projector, ...): a convention of ``register`` that the type cannot carry
    make = cast(Callable[..., Method], cls)
    method = make(backbone, clsp_lambda=required(job.clsp_lambda, "clsp_lambda"),
                  temperature=required(job.temperature, "temperature"),
                  proj_hidden_dim=required(job.proj_hidden_dim, "proj_hidden_dim"),
                  proj_output_dim=required(job.proj_output_dim, "proj_output_dim"),
                  forward_mode=required(job.forward, "forward"), **{name: getattr(job, name) for name in cls.settings})
    method.use_positive_loss(required(job.positive_loss, "positive_loss"))
    if num_classes:
        method.attach_probe(num_classes)
    return method


__all__ = ["METHODS", "EncodedView", "Method", "build_method", "method_only_settings", "register", "registered"]
