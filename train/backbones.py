"""Encoders: torchvision ResNets with the small-image stem, and their exported form.

The exported encoder (``encoder.safetensors`` + ``encoder.json``) is the hand-off from training to
evaluation and to users' own code: weights as safetensors, architecture as a small JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from clsp.errors import UserError
from clsp.io import atomic_path, write_json_atomic

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet-narrow")


def build_backbone(name: str = "resnet18", small_stem: bool = True) -> nn.Module:
    """A ResNet trunk whose forward returns pooled features (``.feature_dim`` gives their size).

    ``small_stem`` is the CIFAR stem (3x3 conv, stride 1, no max-pool) for images of 64 pixels or
    less. ``resnet-narrow`` is a ResNet-18 at a quarter of the width, sized for CPU runs.
    """
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    if name == "resnet-narrow":
        from torchvision.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, [2, 2, 2, 2])
        _narrow(net, 16)
    else:
        net = getattr(torchvision.models, name)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def _narrow(net: nn.Module, base: int) -> None:
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


def export_encoder(backbone: nn.Module, directory: str | Path, arch: dict) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` (``arch`` holds at least ``backbone`` and
    ``small_stem``; training adds the dataset identity, image size and normalisation)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(directory / "encoder.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json_atomic(directory / "encoder.json", {**arch, "feature_dim": backbone.feature_dim})
    return directory


def load_encoder(path: str | Path) -> tuple[nn.Module, dict]:
    """Load an exported encoder (a directory or its ``encoder.json``) in eval mode, with its arch."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    arch_file, weights = directory / "encoder.json", directory / "encoder.safetensors"
    if not arch_file.is_file() or not weights.is_file():
        raise UserError(f"{directory} is not an exported encoder (needs encoder.json and encoder.safetensors); "
                        "pass the directory that clsp-train wrote")
    arch = json.loads(arch_file.read_text())
    net = build_backbone(arch["backbone"], arch.get("small_stem", True))
    try:
        net.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise UserError(f"{weights} does not match the {arch['backbone']} architecture in {arch_file}: "
                        f"{str(err).splitlines()[0]}") from None
    return net.eval(), arch
