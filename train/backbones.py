"""Encoders: torchvision ResNets with a small-image or the ImageNet stem, and their exported form.

The exported encoder (``encoder.safetensors`` + ``encoder.json``) is the hand-off from training to
evaluation and to users' own code: weights as safetensors, architecture as a small JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal, get_args

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.models.resnet import ResNet

from clsp.errors import UserError
from clsp.io import atomic_path, load_weights, write_json_atomic

Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet-narrow"]
Stem = Literal["small", "mid", "imagenet"]  # 3x3 stride-1 conv without (small) or with (mid) max-pool; imagenet
BACKBONES: tuple[str, ...] = get_args(Backbone)
CARD_VERSION: Final = 2


class EncoderCard(BaseModel):
    """``encoder.json``: what a frozen encoder is and how its inputs are prepared (schema version 2).

    Version 1 cards (no ``schema_version``, lambda stored as ``clsp_weight``) and cards that record the stem as
    ``small_stem`` still load. ``source`` names the file an imported encoder came from.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    schema_version: Literal[2] = CARD_VERSION
    backbone: Backbone
    stem: Stem = "small"
    feature_dim: int = Field(ge=1, le=1 << 16)
    method: str | None = Field(None, max_length=64)
    clsp_lambda: float | None = Field(None, ge=0)
    dataset: dict[str, Any] = Field(default_factory=dict)
    image_size: int | None = Field(None, ge=1, le=4096)
    mean: list[float] | None = Field(None, min_length=3, max_length=3)
    std: list[float] | None = Field(None, min_length=3, max_length=3)
    probe_lr: float | None = Field(None, gt=0)  # the recipe's linear-probe learning rate
    settings: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: list[float] | None) -> list[float] | None:
        """Inputs are divided by ``std``: zero or a negative value gives infinite or inverted images."""
        if std is not None and min(std) <= 0:
            raise ValueError("every std must be > 0")
        return std

    @classmethod
    def read(cls, path: Path) -> EncoderCard:
        """Parse a card, converting version 1; one line naming the file when it is not a card."""
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise UserError(f"{path} is not valid JSON ({type(error).__name__}); re-export the encoder with "
                            "clsp-train") from None
        if isinstance(raw, dict) and "schema_version" not in raw:  # version 1
            raw = {**raw, "schema_version": CARD_VERSION, "clsp_lambda": raw.get("clsp_weight")}
        if isinstance(raw, dict) and "stem" not in raw:  # written before the stem had three choices
            raw = {**raw, "stem": "small" if raw.get("small_stem", True) else "imagenet"}
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the card"
            raise UserError(f"{path} is not an encoder card ({where}: {first['msg'].lower()}); re-export the "
                            "encoder with clsp-train") from None


def build_backbone(name: str = "resnet18", stem: Stem = "small") -> nn.Module:
    """A ResNet trunk whose forward returns pooled features (``.feature_dim`` gives their size).

    ``stem`` small is the CIFAR stem (3x3 conv, stride 1, no max-pool), mid the authors' STL-10 one (the same
    conv, max-pool kept), imagenet torchvision's (7x7 conv, stride 2, max-pool). ``resnet-narrow`` is a
    ResNet-18 at a quarter of the width, sized for CPU runs.
    """
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if name == "resnet-narrow":
        from torchvision.models.resnet import BasicBlock

        net = ResNet(BasicBlock, [2, 2, 2, 2])
        _narrow(net, 16)
    else:
        net = getattr(torchvision.models, name)(weights=None)
    if stem != "imagenet":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "small":
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def feature_dim(backbone: nn.Module) -> int:
    """The size of ``backbone``'s features, which ``build_backbone`` records as ``.feature_dim``."""
    dim = getattr(backbone, "feature_dim", None)
    if not isinstance(dim, int):
        raise TypeError(f"{type(backbone).__name__} has no integer .feature_dim; make it with build_backbone")
    return dim


def _narrow(net: ResNet, base: int) -> None:
    """Rebuild a torchvision BasicBlock ResNet with ``base`` channels in its first stage."""
    from torchvision.models.resnet import BasicBlock

    net.inplanes = base
    net.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(base)
    net.layer1 = net._make_layer(BasicBlock, base, 2)
    net.layer2 = net._make_layer(BasicBlock, base * 2, 2, stride=2)
    net.layer3 = net._make_layer(BasicBlock, base * 4, 2, stride=2)
    net.layer4 = net._make_layer(BasicBlock, base * 8, 2, stride=2)
    net.fc = nn.Linear(base * 8, 1000)


def export_encoder(backbone: nn.Module, directory: str | Path, card: EncoderCard) -> Path:
    """Write ``encoder.safetensors`` and its card ``encoder.json`` (the card last: it marks a complete export)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(directory / "encoder.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(directory / "encoder.json", card.model_dump())
    return directory


def load_encoder(path: str | Path) -> tuple[nn.Module, EncoderCard]:
    """Load an exported encoder (a directory or its ``encoder.json``) in eval mode, with its card."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    arch_file, weights = directory / "encoder.json", directory / "encoder.safetensors"
    if not arch_file.is_file() or not weights.is_file():
        raise UserError(f"{directory} is not an exported encoder (needs encoder.json and encoder.safetensors); "
                        "pass the directory that clsp-train wrote")
    card = EncoderCard.read(arch_file)
    net = build_backbone(card.backbone, card.stem)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise UserError(f"{weights} cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                        "re-export the encoder with clsp-train") from None
    load_weights(net, state, weights, f"not a {card.backbone}; re-export the encoder with clsp-train")
    check_values(state, net.state_dict(), weights)
    return net.eval(), card


def check_values(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights: Path) -> None:
    """Refuse weights that load yet give meaningless features (chance accuracy reported as a result): integer
    tensors where floats belong (``load_state_dict`` casts them silently), NaN or infinity."""
    for name, tensor in state.items():
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"{weights}: tensor {name[:80]} is {str(tensor.dtype).removeprefix('torch.')}, not "
                            "floating point (quantised encoders are not supported); re-export it with clsp-train")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{weights}: tensor {name[:80]} holds NaN or infinite values (a diverged run or an "
                            "altered file); use another encoder or re-export it")
