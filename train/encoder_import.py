"""``clsp encoder import``: the authors' released encoders as exported encoders that ``clsp-eval`` evaluates.

Each released encoder (CLSP-SimCLR, CLSP-MoCo, SimCLR, MoCo; ResNet-18 and -50) is one plain torchvision ResNet
``state_dict``: SimCLR files hold the whole model, MoCo files the query encoder, and both keep the MLP head in
``fc`` (``fc.0`` Linear(features, hidden), ReLU, ``fc.2`` Linear(hidden, 256)), which evaluation does not use and
the import drops. On CIFAR the stem is their "small" one (3x3 stride-1 conv, max-pool removed), on STL-10 their
"mid" one (the same conv, max-pool kept). The card records the stem, the authors' normalisation and image size
for the dataset, the probe's learning rate and the source file's name and sha256, so that evaluation follows
their protocol (METHOD.md section 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from clsp.config import Settings, setting
from clsp.datasets import NORMALISATION
from clsp.errors import UserError
from clsp.io import file_digest, load_weights, read_checkpoint, staged_directory
from clsp.train.backbones import EncoderCard, Stem, build_backbone, check_values, export_encoder, feature_dim

HEAD = ("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias")
# The authors' stem and training image size per dataset (their get_resnet sizes and configs' img_size).
AUTHORS_INPUT: dict[str, tuple[Stem, int, str]] = {"cifar10": ("small", 32, "train"),
                                                   "cifar100": ("small", 32, "train"),
                                                   "stl10": ("mid", 64, "unlabeled")}


class EncoderImportJob(Settings):
    """One released encoder file into an encoder folder."""

    checkpoint: str = setting(..., "The authors' encoder file (.pt).", cli_exclude=True, min_length=1)
    backbone: Literal["resnet18", "resnet50"] = setting(..., "The ResNet it was trained with.")
    dataset: Literal["cifar10", "cifar100", "stl10"] = setting(..., "The dataset it was trained on: fixes the stem, "
                                                                    "the image size and the normalisation.")
    out: str = setting(..., "New encoder folder (encoder.safetensors + encoder.json).", role="location",
                       min_length=1)
    method: str | None = setting(None, "What trained it, recorded in the card (e.g. clsp-simclr).", max_length=64)
    probe_lr: float = setting(1.0, "The linear probe's learning rate recorded in the card: the authors' "
                                   "linear_eval_lr, 1.0 for each released encoder but CLSP-MoCo on CIFAR-100 (10.0).",
                              gt=0, le=100)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors by name (a ``module.`` prefix dropped)."""
    state = read_checkpoint(path, "pass the .pt file the authors released")
    if not isinstance(state, dict) or not all(isinstance(name, str) for name in state):
        raise UserError(f"{path} is not a state_dict of tensors by name; pass the .pt file the authors released")
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): value for name, value in state.items()}
    objects = [name for name, value in state.items() if not torch.is_tensor(value)]
    if objects:
        raise UserError(f"{path}: {objects[0][:80]} is a {type(state[objects[0]]).__name__}, not a tensor; pass "
                        f"the encoder's state_dict")
    return state


def import_encoder(job: EncoderImportJob) -> Path:
    """Write ``job.out`` (weights and card at once); refuse, in one line naming the tensors, a file that is not
    a ``job.backbone`` with the authors' stem and MLP head."""
    out = Path(job.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new --out folder or remove it")
    path = Path(job.checkpoint).expanduser()
    state = _read_state(path)
    stem, image_size, split = AUTHORS_INPUT[job.dataset]
    net = build_backbone(job.backbone, stem)
    missing = [name for name in HEAD if name not in state]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)}: not the authors' encoder with its MLP head "
                        f"(fc.0, fc.2); pass a file their SimCLR or MoCo training saved")
    if state["fc.0.weight"].ndim != 2 or state["fc.0.weight"].shape[1] != feature_dim(net):
        raise UserError(f"{path}: fc.0.weight is {list(state['fc.0.weight'].shape)}, but a {job.backbone} head takes "
                        f"{feature_dim(net)} features; pass the --backbone it was trained with")
    trunk = {name: value for name, value in state.items() if name not in HEAD}
    load_weights(net, trunk, path, f"pass the --backbone it was trained with ({job.backbone}, the authors' {stem} "
                                   f"stem for {job.dataset})")
    check_values(trunk, net.state_dict(), path)
    mean, std = NORMALISATION[job.dataset]
    size, sha256 = file_digest(path)
    card = EncoderCard(backbone=job.backbone, stem=stem, feature_dim=feature_dim(net), method=job.method,
                       clsp_lambda=None,
                       dataset={"name": job.dataset, "split": split, "image_size": image_size},
                       image_size=image_size, mean=list(mean), std=list(std), probe_lr=job.probe_lr,
                       source={"file": path.name, "bytes": size, "sha256": sha256, "dropped": list(HEAD)})
    with staged_directory(out) as staging:
        export_encoder(net, staging, card)
    return out
