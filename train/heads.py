"""Projector and predictor MLPs placed on top of the backbone."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp_head(dims: Sequence[int], *, batchnorm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear layers through ``dims`` with (BatchNorm +) ReLU after every hidden layer.

    ``last_bn`` adds a BatchNorm1d after the output layer (NNCLR's projector has one, as solo-learn's does).
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP head needs at least input and output sizes, got {list(dims)}")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(dims) - 2:
            layers += [nn.BatchNorm1d(fan_out)] if batchnorm else []
            layers.append(nn.ReLU(inplace=True))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1]))
    return nn.Sequential(*layers)


def simclr_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    """The authors' two-layer projector for SimCLR and MoCo: Linear-ReLU-Linear, no BatchNorm."""
    return mlp_head([in_dim, hidden_dim, out_dim], batchnorm=False)


def nnclr_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> nn.Sequential:
    """NNCLR's three-layer projector with BatchNorm on its output."""
    return mlp_head([in_dim, hidden_dim, hidden_dim, out_dim], last_bn=True)


def nnclr_predictor(dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    """NNCLR's two-layer predictor, mapping a projection back to the projection space."""
    return mlp_head([dim, hidden_dim, dim])
