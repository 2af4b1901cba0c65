"""The contrastive methods, each with the CLSP term: ``build_method(job, backbone)``.

Every module in this folder is imported here, and each registers its method (``base.register``), so
adding a method is adding one file: its own settings become training settings (``own_fields``), its metrics
are logged and its display name is the report's. A method defined elsewhere registers the same way; its own
settings need it registered before ``clsp.train.config`` is imported, since the settings are made then.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from clsp.config import required, setting
from clsp.errors import UserError
from clsp.train.methods.base import REGISTRY, EncodedView, Method, own, own_settings, register

if TYPE_CHECKING:
    from clsp.train.config import TrainJob

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
        for own_setting in own_settings(cls):
            owners[own_setting] = (*owners.get(own_setting, ()), name)
    return owners


def own_defaults(method: str) -> dict[str, Any]:
    """The recipe values of ``method``'s own settings, before ``Recipe.by_dataset`` applies."""
    return {name: declared.default for name, (_, declared) in own_settings(REGISTRY[method]).items()}


def own_fields() -> dict[str, tuple[Any, Any]]:
    """The training settings the registered methods declare, as pydantic fields (unset: the recipe's), the
    help naming each method that takes one; declared by several methods, a setting must agree in type and
    constraints."""
    fields: dict[str, tuple[Any, Any]] = {}
    declared: dict[str, list[tuple[str, Any, Any]]] = {}
    for method, cls in REGISTRY.items():
        for name, (kind, declaration) in own_settings(cls).items():
            declared.setdefault(name, []).append((method, kind, declaration))
    for name, takers in declared.items():
        _, kind, first = takers[0]
        clash = [method for method, other, d in takers if (other, d.constraints) != (kind, first.constraints)]
        if clash:
            raise TypeError(f"the setting {name} of {', '.join(clash)} differs in type or constraints from "
                            f"{takers[0][0]}'s")
        help_text = "; ".join(f"{method}: {d.help}" for method, _, d in takers) + " [default: the method's recipe]"
        fields[name] = (kind | None, setting(None, help_text, **first.constraints))
    return fields


def display_name(method: str) -> str:
    """How the report writes ``method`` (``SimCLR``); the name itself for a method that sets none."""
    cls = REGISTRY.get(method)
    return (cls.display_name or cls.name) if cls is not None else method


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
                  forward_mode=required(job.forward, "forward"),
                  **{name: getattr(job, name) for name in own_settings(cls)})
    method.use_positive_loss(required(job.positive_loss, "positive_loss"))
    if num_classes:
        method.attach_probe(num_classes)
    return method


__all__ = ["METHODS", "EncodedView", "Method", "build_method", "display_name", "method_only_settings", "own",
           "own_defaults", "own_fields", "register", "registered"]
