"""The dataset registry: names, splits, imagefolder layouts, fingerprints and offline errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clsp.datasets import dataset_names, get_dataset
from clsp.errors import UserError


def _write_images(folder, count, size=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def test_digits_splits_are_disjoint_labelled_rgb():
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (16, 16) and 0 <= label < 10
    assert set(np.unique(train.labels())) == set(range(10)) == set(np.unique(test.labels()))
    train_rows = {im.tobytes() for im in train.images}
    assert sum(im.tobytes() in train_rows for im in test.images) < 5  # sklearn digits hold a few exact duplicates
    assert train.fingerprint != test.fingerprint
    assert train.fingerprint == get_dataset("digits", "train").fingerprint  # stable across loads


def test_digits_image_size_option_changes_size_and_fingerprint():
    small, big = get_dataset("digits", image_size=16), get_dataset("digits", image_size=32)
    assert big.image_size == 32 and big[0][0].size == (32, 32)
    assert small.fingerprint != big.fingerprint


def test_unknown_dataset_and_split_are_one_line_errors():
    with pytest.raises(UserError, match="unknown dataset 'cifar11'.*digits"):
        get_dataset("cifar11")
    with pytest.raises(UserError, match="splits train, test"):
        get_dataset("digits", "validation")
    assert "imagefolder:PATH" in dataset_names()


def test_cifar_offline_names_where_to_put_files(tmp_path):
    with pytest.raises(UserError) as err:
        get_dataset("cifar10", root=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "cifar10") in message and "\n" not in message


def test_imagefolder_with_classes(tmp_path):
    _write_images(tmp_path / "cat", 3)
    _write_images(tmp_path / "dog", 2, seed=1)
    ds = get_dataset(f"imagefolder:{tmp_path}")
    assert len(ds) == 5 and ds.num_classes == 2
    assert list(ds.labels()) == [0, 0, 0, 1, 1]
    assert ds[4][0].mode == "RGB"


def test_imagefolder_flat_has_no_labels_and_sorted_order(tmp_path):
    _write_images(tmp_path, 4)
    ds = get_dataset(f"imagefolder:{tmp_path}")
    assert ds.num_classes == 0 and not ds.has_labels and set(ds.labels()) == {-1}
    assert [f.name for f in ds.files] == sorted(f.name for f in ds.files)


def test_imagefolder_names_non_image_and_unreadable_files(tmp_path):
    _write_images(tmp_path, 2)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt"):
        get_dataset(f"imagefolder:{tmp_path}")
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="broken.png"):
        get_dataset(f"imagefolder:{tmp_path}")


def test_imagefolder_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        get_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no files"):
        get_dataset(f"imagefolder:{tmp_path / 'empty'}")


def test_fingerprint_changes_when_one_image_changes(tmp_path):
    _write_images(tmp_path, 3)
    before = get_dataset(f"imagefolder:{tmp_path}").fingerprint
    image = np.asarray(Image.open(tmp_path / "img01.png")).copy()
    image[0, 0, 0] ^= 1
    Image.fromarray(image).save(tmp_path / "img01.png")
    assert get_dataset(f"imagefolder:{tmp_path}").fingerprint != before
    digits = get_dataset("digits")
    original = digits.fingerprint
    digits.images[5, 3, 3, 0] ^= 1
    digits._fingerprint = None
    assert digits.fingerprint != original


def test_cli_unknown_dataset_is_one_line_without_traceback():
    import click

    from clsp.datasets import get_dataset as lookup
    from clsp.errors import Command

    @click.command(cls=Command)
    def probe():
        lookup("nope")

    result = CliRunner().invoke(probe, [])
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: unknown dataset 'nope'")
    assert "Traceback" not in result.output
