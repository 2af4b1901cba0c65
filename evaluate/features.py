"""Frozen-encoder features: the encoder's own preprocessing, and an on-disk cache.

Images are resized to the encoder's training image size and normalised with its training mean and
std (both recorded in ``encoder.json``), so any dataset can be fed to any encoder. Features of a
dataset are computed once and cached under a key made of the encoder weights' hash, the dataset's
content fingerprint and the preprocessing, so a retrained encoder never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clsp.datasets import ImageDataset, dataset_info, get_dataset, validation_splits
from clsp.errors import UserError
from clsp.images import to_float
from clsp.io import atomic_path, file_digest
from clsp.runtime import progress
from clsp.train.backbones import EncoderCard, load_encoder

CACHE_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """How images are prepared for an encoder: square size and per-channel normalisation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class FrozenEncoder:
    """An exported encoder in eval mode, with the hash of its weights."""

    module: nn.Module
    card: EncoderCard
    fingerprint: str
    path: Path
    device: torch.device

    def input_spec(self, dataset: ImageDataset) -> InputSpec:
        """The encoder's training size and statistics; the dataset's where the encoder records none."""
        size = int(self.card.image_size or dataset.image_size)
        mean = [float(v) for v in (self.card.mean or dataset.mean)]  # three values: the card checks its own
        std = [float(v) for v in (self.card.std or dataset.std)]
        return InputSpec(size, (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))

    def describe(self) -> dict:
        """What results record about the encoder."""
        info = self.card.model_dump(include={"backbone", "stem", "feature_dim", "method", "clsp_lambda",
                                             "image_size", "probe_lr"})
        return {"path": str(self.path), "fingerprint": self.fingerprint, "trained_on": self.card.dataset.get("name"),
                **info}

    @torch.no_grad()
    def embed(self, images: np.ndarray, spec: InputSpec, flip: bool = False) -> np.ndarray:
        """float32 ``[n, feature_dim]`` features of uint8 ``[n, H, W, 3]`` images."""
        x = to_float(images, signed=False).to(self.device)
        if x.shape[-2:] != (spec.size, spec.size):
            x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True, align_corners=False)
        if flip:
            x = torch.flip(x, dims=[3])
        mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        return self.embed_normalised((x - mean) / std)

    @torch.no_grad()
    def embed_normalised(self, x: torch.Tensor) -> np.ndarray:
        """float32 features of an already resized and normalised float ``[n, 3, size, size]`` batch."""
        return self.module(x.to(self.device)).float().cpu().numpy()


def load_frozen_encoder(path: str | Path, device: str | torch.device | None = None) -> FrozenEncoder:
    """Load an exported encoder and check that it takes RGB images of its recorded size."""
    module, card = load_encoder(path)
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None or first_conv.in_channels != 3:
        raise UserError(f"encoder {directory} does not take 3-channel RGB images; export an RGB backbone")
    size = card.image_size or 32
    module = module.to(device)
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, 3, size, size, device=device))
    except RuntimeError as err:
        raise UserError(f"encoder {directory} cannot run on {size}x{size} images: {str(err).splitlines()[0]}") from None
    if out.shape != (2, card.feature_dim):
        raise UserError(f"encoder {directory} gives features of shape {tuple(out.shape[1:])} but encoder.json says "
                        f"feature_dim {card.feature_dim}; re-export the encoder")
    # identified by content, not timestamps: the weights' and the card's digests
    fingerprint = hashlib.sha256("".join(file_digest(directory / name)[1] for name in
                                         ("encoder.safetensors", "encoder.json")).encode()).hexdigest()[:16]
    return FrozenEncoder(module.eval(), card, fingerprint, directory, device)


def cache_key(encoder: FrozenEncoder, dataset: ImageDataset, spec: InputSpec, flip: bool) -> str:
    identity = {"version": CACHE_VERSION, "encoder": encoder.fingerprint, "dataset": dataset.name,
                "split": dataset.split, "data": dataset.fingerprint, "spec": [spec.size, spec.mean, spec.std],
                "flip": flip}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def embed_batches(encoder: FrozenEncoder, count: int, fetch: Callable[[np.ndarray], np.ndarray], spec: InputSpec,
                  *, batch_size: int = 256, flip: bool = False, desc: str = "features") -> np.ndarray:
    """float32 features of ``count`` images that ``fetch(indices)`` returns as uint8 ``[n, H, W, 3]``."""
    chunks = [np.zeros((0, encoder.card.feature_dim), np.float32)]
    bar = progress(total=count, desc=desc, unit="img")
    for start in range(0, count, batch_size):
        indices = np.arange(start, min(start + batch_size, count))
        chunks.append(encoder.embed(fetch(indices), spec, flip))
        bar.update(len(indices))
    bar.close()
    return np.concatenate(chunks)


def extract_features(encoder: FrozenEncoder, dataset: ImageDataset, *, cache_dir: str | Path | None = None,
                     flip: bool = False, batch_size: int = 256) -> np.ndarray:
    """float32 ``[len(dataset), feature_dim]`` features, read from ``cache_dir`` when already there."""
    spec = encoder.input_spec(dataset)
    path = None
    if cache_dir is not None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset.name}-{dataset.split}{'-flip' if flip else ''}")[-80:]
        path = Path(cache_dir) / f"{stem}-{cache_key(encoder, dataset, spec, flip)}.npz"
        if path.is_file():
            return _cached_features(path, (len(dataset), encoder.card.feature_dim))
    features = embed_batches(encoder, len(dataset), dataset.array, spec, batch_size=batch_size, flip=flip,
                             desc=f"features {dataset.name}/{dataset.split}")
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, features=features)
    return features


def randomly_flipped_features(encoder: FrozenEncoder, dataset: ImageDataset, *, seed: int,
                              cache_dir: str | Path | None = None, batch_size: int = 256) -> np.ndarray:
    """Features of ``dataset`` with each image mirrored or not at random (probability 0.5, drawn from ``seed``).

    The encoder is frozen and in eval mode, so this equals a random horizontal flip in front of it; the plain
    and the mirrored features are each extracted (and cached) once and chosen between per image.
    """
    plain = extract_features(encoder, dataset, cache_dir=cache_dir, batch_size=batch_size)
    mirrored = extract_features(encoder, dataset, cache_dir=cache_dir, flip=True, batch_size=batch_size)
    chosen = np.random.default_rng(seed).random(len(dataset)) < 0.5
    return np.where(chosen[:, None], mirrored, plain)


def _cached_features(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A cache entry, checked: a damaged one (an interrupted copy, a full disk) is refused, never half-used."""
    try:
        with np.load(path, allow_pickle=False) as cached:
            features = cached["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"feature cache {path} is damaged ({type(error).__name__}); delete it and the features "
                        "are computed again") from None
    if features.shape != shape or features.dtype != np.float32:
        raise UserError(f"feature cache {path} holds {features.dtype} {features.shape}, not float32 {shape}; "
                        "delete it and the features are computed again")
    return features


def _imagefolder_classes(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def test_split(name: str, *, root: str | Path, download: bool, image_size: int | None) -> ImageDataset:
    """The registry's test split of ``name`` (``test/`` for an ``imagefolder:`` dataset)."""
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1])
        if not (folder / "test").is_dir():
            raise UserError(f"{name} has no test/ sub-folder; evaluation needs {folder}/train and {folder}/test, "
                            "each with one sub-folder of images per class")
        return get_dataset(name, "test", root=root, download=download, image_size=image_size)
    info = dataset_info(name)  # unknown names: the registry's line
    split = info.test_split if info is not None else None
    if split is None:
        raise UserError(f"dataset {name} has no test split; use one with labelled train and test splits "
                        "or imagefolder:PATH with train/ and test/ sub-folders")
    return get_dataset(name, split, root=root, download=download, image_size=image_size)


def labelled_splits(name: str, protocol: str, *, root: str | Path, download: bool, image_size: int | None,
                    validation: float = 0.0) -> tuple[ImageDataset, ImageDataset]:
    """Train and test splits of a labelled dataset, or one line saying why ``protocol`` cannot use it.

    With ``validation`` > 0 they are the training split less its validation images and those images
    (``clsp.datasets.validation_splits``); the test split is then not read at all."""
    train = get_dataset(name, "train", root=root, download=download, image_size=image_size)
    if not train.has_labels or (train.labels() < 0).any():
        raise UserError(f"dataset {name} has no labels, which the {protocol} protocol needs; use a labelled "
                        "dataset (for imagefolder: train/ and test/ folders with one sub-folder per class)")
    if validation:
        return validation_splits(train, validation)
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1])
        if not (folder / "train").is_dir():
            raise UserError(f"{name} has no train/ sub-folder; evaluation needs {folder}/train and {folder}/test, "
                            "each with one sub-folder of images per class")
    test = test_split(name, root=root, download=download, image_size=image_size)
    if name.startswith("imagefolder:"):
        folder = Path(name.split(":", 1)[1])
        train_classes, test_classes = _imagefolder_classes(folder / "train"), _imagefolder_classes(folder / "test")
        if train_classes != test_classes:
            raise UserError(f"{name}: train/ and test/ have different class folders "
                            f"({len(train_classes)} vs {len(test_classes)}); give both the same classes")
    elif not test.has_labels or (test.labels() < 0).any() or test.num_classes != train.num_classes:
        raise UserError(f"the test split of {name} has no labels matching its train split; "
                        f"the {protocol} protocol needs both labelled")
    return train, test
