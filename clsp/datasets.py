"""Dataset registry: one name per dataset, shared by every stage.

Every dataset yields ``(PIL RGB image, label or -1)`` by index, knows its length, and has a
content fingerprint (a short hash of the split's images in order) that later stages use to refuse
shards or features made from other data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from clsp.errors import UserError

DEFAULT_DATA_ROOT = os.environ.get("CLSP_DATA_ROOT", "data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Per-channel normalisation statistics of the training splits.
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
}
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _hash(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


@dataclass
class ImageDataset:
    """An indexable image dataset with a stable order and a content fingerprint."""

    name: str
    split: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self[0][0].size[0]

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    def labels(self) -> np.ndarray:
        return np.array([self[i][1] for i in range(len(self))], dtype=np.int64)

    def describe(self) -> dict:
        """The identity recorded in manifests and caches."""
        return {"name": self.name, "split": self.split, "size": len(self), "fingerprint": self.fingerprint,
                "image_size": self.image_size, "num_classes": self.num_classes}


@dataclass
class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 ``[N, H, W, 3]`` array (CIFAR, STL-10, digits)."""

    images: np.ndarray = field(default=None, repr=False)
    targets: np.ndarray = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.targets[index])

    def array(self, indices) -> np.ndarray:
        """uint8 ``[n, H, W, 3]`` images for a batch of indices (fast path for training)."""
        return self.images[np.asarray(indices)]

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def labels(self) -> np.ndarray:
        return self.targets.copy()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            shape = str(self.images.shape).encode()
            self._fingerprint = _hash([shape, self.images.tobytes()])
        return self._fingerprint


@dataclass
class ImageFolderDataset(ImageDataset):
    """Any folder of images; labels from sub-folders when present, else -1."""

    files: list[Path] = field(default_factory=list, repr=False)
    targets: np.ndarray = field(default=None, repr=False)
    resize: int | None = None
    root: Path = field(default=Path("."), repr=False)

    def __post_init__(self) -> None:
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"cannot read image {path}: {err}; remove or replace the file") from None
        if self.resize:
            img = img.resize((self.resize, self.resize), Image.BICUBIC)
        return img, int(self.targets[index])

    def array(self, indices) -> np.ndarray:
        return np.stack([np.asarray(self[int(i)][0]) for i in indices])

    def labels(self) -> np.ndarray:
        return self.targets.copy()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _hash(
                part for f in self.files for part in (f.relative_to(self.root).as_posix().encode(), f.read_bytes())
            )
        return self._fingerprint


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def _resize_array(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, 3).astype(np.float64) / 255.0
    return tuple(float(v) for v in flat.mean(0)), tuple(float(max(v, 1e-3)) for v in flat.std(0))


DIGITS_DEFAULT_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(split: str = "train", image_size: int | None = None, **_) -> ArrayDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB, upsampled.

    Ships with scikit-learn, so it is the embedded default that works offline. The train/test split
    is a fixed stratified permutation (seed 0, 20% test).
    """
    from sklearn.datasets import load_digits as sk_digits

    _require(split in ("train", "test"), f"digits has splits train and test, not {split!r}")
    size = image_size or DIGITS_DEFAULT_SIZE
    data = sk_digits()
    grey = np.clip(data.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_idx = []
    for label in range(10):
        members = np.flatnonzero(data.target == label)
        test_idx.extend(rng.permutation(members)[: int(round(len(members) * DIGITS_TEST_FRACTION))])
    is_test = np.zeros(len(grey), dtype=bool)
    is_test[test_idx] = True
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    big = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey[keep]])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    train_rgb = rgb if split == "train" else None
    mean, std = _stats(train_rgb if train_rgb is not None else rgb)
    return ArrayDataset(name="digits", split=split, num_classes=10, mean=mean, std=std,
                        images=rgb, targets=data.target[keep])


def _torchvision(name: str, split: str, root: str, download: bool, image_size: int | None) -> ArrayDataset:
    import torchvision

    splits = {"cifar10": ("train", "test"), "cifar100": ("train", "test"), "stl10": ("unlabeled", "train", "test")}
    _require(split in splits[name], f"{name} has splits {', '.join(splits[name])}, not {split!r}")
    root_path = Path(root) / name
    try:
        if name == "stl10":
            ds = torchvision.datasets.STL10(str(root_path), split=split, download=download)
            images, targets = ds.data.transpose(0, 2, 3, 1), np.asarray(ds.labels)
            num_classes = 10
        else:
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            ds = cls(str(root_path), train=split == "train", download=download)
            images, targets = ds.data, np.asarray(ds.targets)
            num_classes = 10 if name == "cifar10" else 100
    except (RuntimeError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{name} ({split}) is not under {root_path} and could not be downloaded ({reason}); "
            f"put the torchvision {name} files in {root_path} or pass --data-root"
        ) from None
    targets = np.where(targets < 0, -1, targets)
    mean, std = _STATS[name]
    return ArrayDataset(name=name, split=split, num_classes=num_classes, mean=mean, std=std,
                        images=_resize_array(images, image_size), targets=targets)


def load_imagefolder(path: str, split: str = "train", image_size: int | None = None) -> ImageFolderDataset:
    """A folder of images; ``PATH/<class>/<image>`` gives labels, a flat folder gives -1."""
    root = Path(path)
    _require(root.is_dir(), f"imagefolder path {root} is not a directory; pass imagefolder:PATH to a folder of images")
    if (root / split).is_dir():
        root = root / split
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    _require(bool(files), f"imagefolder {root} holds no files; put images (or class sub-folders of images) in it")
    bad = [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    _require(not bad, f"imagefolder {root} has non-image files ({', '.join(str(b.relative_to(root)) for b in bad[:5])}"
             f"{' ...' if len(bad) > 5 else ''}); remove them or move them out of the folder")
    classes = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    _require(not classes or all(p.parent != root for p in files),
             f"imagefolder {root} mixes images at the top level with class sub-folders; use one layout")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.array([index[p.relative_to(root).parts[0]] if classes else -1 for p in files], dtype=np.int64)
    ds = ImageFolderDataset(name=f"imagefolder:{path}", split=split, num_classes=len(classes),
                            mean=_IMAGENET_STATS[0], std=_IMAGENET_STATS[1], files=files, targets=targets,
                            resize=image_size, root=root)
    for i in range(len(ds)):  # name unreadable files now, not mid-run
        ds[i]
    return ds


_LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "digits": lambda split, root, download, image_size: load_digits(split, image_size),
    "cifar10": lambda split, root, download, image_size: _torchvision("cifar10", split, root, download, image_size),
    "cifar100": lambda split, root, download, image_size: _torchvision("cifar100", split, root, download, image_size),
    "stl10": lambda split, root, download, image_size: _torchvision("stl10", split, root, download, image_size),
}

DEFAULT_SPLITS = {"stl10": "unlabeled"}
TEST_SPLITS = {"digits": "test", "cifar10": "test", "cifar100": "test", "stl10": "test"}


def dataset_names() -> list[str]:
    return sorted(_LOADERS) + ["imagefolder:PATH"]


def get_dataset(name: str, split: str | None = None, root: str | os.PathLike = DEFAULT_DATA_ROOT,
                download: bool = True, image_size: int | None = None) -> ImageDataset:
    """Look a dataset up by registry name (``digits``, ``cifar10``, ``imagefolder:PATH``, ...)."""
    if name.startswith("imagefolder:"):
        return load_imagefolder(name.split(":", 1)[1], split or "train", image_size)
    if name not in _LOADERS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(dataset_names())}")
    return _LOADERS[name](split or DEFAULT_SPLITS.get(name, "train"), str(root), download, image_size)
