"""Dataset registry: one name per dataset, shared by every stage.

Every dataset yields ``(PIL RGB image, label or -1)`` by index, knows its length, and has a
content fingerprint (a short hash of the split's images in order) that later stages use to refuse
shards or features made from other data.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clsp.errors import UserError, short, short_path

DEFAULT_DATA_ROOT = os.environ.get("CLSP_DATA_ROOT", "data")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
MAX_IMAGE_PIXELS = 4096 * 4096  # per image file, from its header, before a pixel is decoded (4096: clsp's largest size)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (or 32-bit) grey: RGB conversion would clip to white


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

    def array(self, indices) -> np.ndarray:  # pragma: no cover - abstract
        """uint8 ``[n, H, W, 3]`` images for a batch of indices."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The identity recorded in manifests and caches."""
        return {"name": self.name, "split": self.split, "size": len(self), "fingerprint": self.fingerprint,
                "image_size": self.image_size, "num_classes": self.num_classes}


@dataclass
class ArrayDataset(ImageDataset):
    """Images held in memory as a uint8 ``[N, H, W, 3]`` array (CIFAR, STL-10, digits)."""

    images: np.ndarray = field(repr=False)
    targets: np.ndarray = field(repr=False)

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
    targets: np.ndarray = field(repr=False, kw_only=True)
    resize: int | None = None
    root: Path = field(default=Path("."), repr=False)

    def __post_init__(self) -> None:
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        img = read_image(self.files[index])
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


def _grey_to_rgb(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit grey image scaled to 8 bits (65535 -> 255), as RGB; wider values are refused, not clipped."""
    values = np.asarray(img, dtype=np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise UserError(f"image {path} holds {img.mode} values outside 0..65535 (a 32-bit image?); save it as an "
                        f"8- or 16-bit image")
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def read_image(path: Path) -> Image.Image:
    """An image file as 8-bit RGB, its pixel count checked from the header first (a small file can declare a
    huge image); 16-bit grey is scaled to 8 bits, floating-point images are refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise UserError(f"image {path} is {width}x{height}, over the limit of {MAX_IMAGE_PIXELS} pixels; "
                                    f"shrink it or remove it from the folder")
                if img.mode == "F":
                    raise UserError(f"image {path} has floating-point pixels; save it as an 8- or 16-bit image")
                return _grey_to_rgb(img, path) if img.mode in _WIDE_GREY else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"image {path} declares over {MAX_IMAGE_PIXELS} pixels (a decompression bomb?); shrink it or "
                        f"remove it from the folder") from None
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {' '.join(str(err).split())[:150]}; remove or replace the "
                        f"file") from None


def _require(condition: bool | np.bool_, message: str) -> None:
    if not condition:
        raise UserError(message)


def _resize_array(images: np.ndarray, size: int | None) -> np.ndarray:
    if size is None or images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def _stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    flat = images.reshape(-1, 3).astype(np.float64) / 255.0
    mean, std = [float(v) for v in flat.mean(0)], [float(max(v, 1e-3)) for v in flat.std(0)]
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


DIGITS_DEFAULT_SIZE = 16
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_digits(split: str = "train", image_size: int | None = None, **_) -> ArrayDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as RGB, upsampled.

    Ships with scikit-learn, so it is the embedded default that works offline. The train/test split
    is a fixed stratified permutation (seed 0, 20% test).
    """
    from sklearn.datasets import load_digits as sk_digits

    size = image_size or DIGITS_DEFAULT_SIZE
    data = sk_digits()
    grey = np.clip(data.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_idx: list[int] = []
    for label in range(10):
        members = np.flatnonzero(data.target == label)
        test_idx.extend(rng.permutation(members)[: int(round(len(members) * DIGITS_TEST_FRACTION))])
    is_test = np.zeros(len(grey), dtype=bool)
    is_test[test_idx] = True
    keep = np.flatnonzero(is_test if split == "test" else ~is_test)
    big = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in grey[keep]])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    mean, std = _stats(rgb)
    return ArrayDataset(name="digits", split=split, num_classes=10, mean=mean, std=std,
                        images=rgb, targets=data.target[keep])


# Per-channel normalisation of the training images: the authors' values (METHOD.md section 3; for STL-10 their
# simclr_stl10 recipe's).
NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261)),
}


def _torchvision(name: str, split: str, root: str, download: bool, image_size: int | None) -> ArrayDataset:
    import torchvision

    from clsp.io import missing_directories, remove_empty_directories

    root_path = Path(root) / name
    made = missing_directories(root_path)  # what the download would make
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
        remove_empty_directories(made)  # a failed download leaves no empty folders behind
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"{name} ({split}) is not under {root_path} and could not be downloaded ({reason}); "
            f"put the torchvision {name} files in {root_path} or pass --data-root"
        ) from None
    targets = np.where(targets < 0, -1, targets)
    mean, std = NORMALISATION[name]
    return ArrayDataset(name=name, split=split, num_classes=num_classes, mean=mean, std=std,
                        images=_resize_array(images, image_size), targets=targets)


def load_imagefolder(path: str, split: str = "train", image_size: int | None = None) -> ImageFolderDataset:
    """A folder of images; ``PATH/<class>/<image>`` gives labels, a flat folder gives -1."""
    root = Path(path)
    _require(root.is_dir(),
             f"imagefolder path {short_path(root)} is not a directory; pass imagefolder:PATH to a folder of images")
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
    first: tuple[tuple[int, int], Path] | None = None
    for file in files:  # name unreadable files, and images of another size, now, not mid-run
        size = read_image(file).size
        first = first or (size, file)
        _require(image_size is not None or size == first[0] and size[0] == size[1],
                 f"imagefolder {root}: {_size_text(file, size, root)}" + (
                     f" but {_size_text(first[1], first[0], root)}" if size != first[0] else ", not square")
                 + "; images must be square and of one size, or pass --image-size N to resize them all")
    return ds


def _size_text(path: Path, size: tuple[int, int], root: Path) -> str:
    return f"{str(path.relative_to(root))[:80]} is {size[0]}x{size[1]}"


@dataclass(frozen=True)
class KnownDataset:
    """Everything the project knows about one named dataset, in one place."""

    load: Callable[[str, str, bool, int | None], ImageDataset]  # (split, root, download, image_size)
    splits: tuple[str, ...]
    train_split: str
    test_split: str | None
    image_size: int  # of the images as loaded, unless resized
    # the diffusion model: a hub id, or a model shipped with the package (``clsp.generate.pretrained``)
    default_unet: str | None = None
    default_conditional_unet: str | None = None  # the same, class-conditional: what ``--guidance`` draws from
    ddpm_preset: str = "ddpm-cifar"  # the U-Net preset `clsp ddpm train --preset auto` picks


def _vision(name: str) -> Callable[[str, str, bool, int | None], ImageDataset]:
    return lambda split, root, download, image_size: _torchvision(name, split, root, download, image_size)


DATASETS: dict[str, KnownDataset] = {
    "digits": KnownDataset(load=lambda split, root, download, image_size: load_digits(split, image_size),
                          splits=("train", "test"), train_split="train", test_split="test",
                          image_size=DIGITS_DEFAULT_SIZE, default_unet="digits-ddpm",
                          default_conditional_unet="digits-ddpm-cond", ddpm_preset="digits"),
    "cifar10": KnownDataset(
        load=_vision("cifar10"), splits=("train", "test"), train_split="train", test_split="test", image_size=32,
        default_unet="google/ddpm-cifar10-32"),
    "cifar100": KnownDataset(
        load=_vision("cifar100"), splits=("train", "test"), train_split="train", test_split="test", image_size=32),
    "stl10": KnownDataset(load=_vision("stl10"), splits=("unlabeled", "train", "test"), train_split="unlabeled",
                         test_split="test", image_size=96),
}
IMAGEFOLDER = "imagefolder:"


def dataset_info(name: str) -> KnownDataset | None:
    """The registry entry of ``name``; None for ``imagefolder:PATH`` (a folder carries no facts)."""
    if name.startswith(IMAGEFOLDER):
        return None
    if name not in DATASETS:
        raise UserError(f"unknown dataset {short(name)}; choose one of: {', '.join(dataset_names())}")
    return DATASETS[name]


def dataset_names() -> list[str]:
    return sorted(DATASETS) + ["imagefolder:PATH"]


def get_dataset(name: str, split: str | None = None, root: str | os.PathLike = DEFAULT_DATA_ROOT,
                download: bool = True, image_size: int | None = None) -> ImageDataset:
    """Look a dataset up by registry name (``digits``, ``cifar10``, ``imagefolder:PATH``, ...)."""
    info = dataset_info(name)
    if info is None:
        return load_imagefolder(name[len(IMAGEFOLDER):], split or "train", image_size)
    split = split or info.train_split
    _require(split in info.splits, f"{name} has splits {', '.join(info.splits)}, not {split!r}")
    return info.load(split, str(root), download, image_size)


# ---- a validation split carved from the training split -------------------------------------------------------


@dataclass
class SubsetDataset(ImageDataset):
    """Some images of another dataset, by index: the fit or the validation part of a training split."""

    base: ImageDataset = field(repr=False)
    indices: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.base[int(self.indices[index])]

    def array(self, indices) -> np.ndarray:
        return self.base.array(self.indices[np.asarray(indices)])

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def labels(self) -> np.ndarray:
        return self.base.labels()[self.indices]

    @property
    def fingerprint(self) -> str:
        return _hash([self.base.fingerprint.encode(), self.split.encode(), self.indices.tobytes()])


def validation_indices(dataset: ImageDataset, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, validation)``: sorted indices of a labelled training split, ``fraction`` of each label held out.

    The draw is seeded by the data's fingerprint, not by a run's seed, so every run, seed and evaluation
    of one dataset holds out the same images, and a study's choice never depends on which seeds it ran."""
    _require(0 < fraction < 1, f"the validation fraction must lie in (0, 1), not {fraction}")
    labels = dataset.labels() if dataset.has_labels else np.full(len(dataset), -1)
    _require(bool(len(labels)) and (labels >= 0).all(),
             f"{dataset.name} ({dataset.split}) has no labels; a validation split needs a labelled training split")
    rng = np.random.default_rng(int(dataset.fingerprint, 16))
    held = [rng.permutation(np.flatnonzero(labels == label))[: int(round((labels == label).sum() * fraction))]
            for label in np.unique(labels)]
    is_held = np.zeros(len(labels), dtype=bool)
    is_held[np.concatenate(held)] = True
    _require(is_held.any() and not is_held.all(), f"{dataset.name} ({dataset.split}) has too few images per label "
             f"to hold out {fraction:g} of them as validation data; use a larger fraction or dataset")
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


def validation_splits(dataset: ImageDataset, fraction: float) -> tuple[SubsetDataset, SubsetDataset]:
    """The fit part (training split less the validation images) and the validation part, as datasets."""
    fit, held = validation_indices(dataset, fraction)

    def subset(part: str, indices: np.ndarray) -> SubsetDataset:
        return SubsetDataset(name=dataset.name, split=f"{dataset.split}-{part}{fraction:g}",
                             num_classes=dataset.num_classes, mean=dataset.mean, std=dataset.std, base=dataset,
                             indices=indices)

    return subset("fit", fit), subset("validation", held)
