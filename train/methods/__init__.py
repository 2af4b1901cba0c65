"""The contrastive methods, each with the CLSP term: ``build_method(name, backbone, ...)``."""

from __future__ import annotations

from torch import nn

from clsp.errors import UserError
from clsp.train.methods.base import EncodedView, Method
from clsp.train.methods.moco import MoCo
from clsp.train.methods.nnclr import NNCLR
from clsp.train.methods.simclr import SimCLR
from clsp.train.neighbours import check_index

METHODS = ("simclr", "moco", "nnclr")
_CLASSES: dict[str, type[Method]] = {"simclr": SimCLR, "moco": MoCo, "nnclr": NNCLR}

# lambda of METHOD.md: 1.0 with SimCLR, 0.5 with MoCo; NNCLR takes SimCLR's.
DEFAULT_CLSP_WEIGHT = {"simclr": 1.0, "moco": 0.5, "nnclr": 1.0}

# Head and memory sizes of METHOD.md (CIFAR ResNet-18 settings; MoCo's as solo-learn's mocov2plus).
DEFAULT_SIZES = {
    "simclr": {"proj_hidden_dim": 2048, "proj_output_dim": 256},
    "moco": {"proj_hidden_dim": 2048, "proj_output_dim": 256, "queue_size": 32768},
    "nnclr": {"proj_hidden_dim": 2048, "proj_output_dim": 256, "pred_hidden_dim": 4096, "queue_size": 65536},
}


def build_method(name: str, backbone: nn.Module, *, clsp_weight: float | None = None, temperature: float = 0.2,
                 proj_hidden_dim: int | None = None, proj_output_dim: int | None = None,
                 pred_hidden_dim: int | None = None, queue_size: int | None = None, momentum: float = 0.99,
                 nn_index: str = "flat") -> Method:
    """The method ``name`` on ``backbone`` (which needs ``.feature_dim``); None means METHOD.md's default.

    ``momentum`` is MoCo's base EMA coefficient; ``nn_index`` is NNCLR's support-set search
    (``flat`` exact, ``ivf``/``hnsw`` approximate for large support sets).
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    given = {"proj_hidden_dim": proj_hidden_dim, "proj_output_dim": proj_output_dim,
             "pred_hidden_dim": pred_hidden_dim, "queue_size": queue_size}
    sizes = dict(DEFAULT_SIZES[name])
    for key, value in given.items():
        if value is None:
            continue
        if key not in sizes:
            users = [m for m in METHODS if key in DEFAULT_SIZES[m]]
            raise UserError(f"{key} applies only to {' and '.join(users)}, not to {name}; leave it unset")
        if value < 1:
            raise UserError(f"{key} must be a positive integer, got {value}")
        sizes[key] = int(value)
    clsp_weight = DEFAULT_CLSP_WEIGHT[name] if clsp_weight is None else clsp_weight
    if clsp_weight < 0:
        raise UserError(f"the CLSP weight must be 0 (baseline) or positive, got {clsp_weight}")
    if temperature <= 0:
        raise UserError(f"the temperature must be positive, got {temperature}")
    if not 0 <= momentum <= 1:
        raise UserError(f"the MoCo momentum must lie in [0, 1], got {momentum}")
    check_index(nn_index)
    extra = {"moco": {"momentum": momentum}, "nnclr": {"nn_index": nn_index}}.get(name, {})
    return _CLASSES[name](backbone, clsp_weight=clsp_weight, temperature=temperature, **sizes, **extra)


__all__ = ["DEFAULT_CLSP_WEIGHT", "DEFAULT_SIZES", "METHODS", "EncodedView", "Method", "MoCo", "NNCLR", "SimCLR",
           "build_method"]
