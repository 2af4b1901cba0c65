"""Control positive sources: an extra view of the anchor itself (self) and a same-class real image (oracle)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.train.augment import view_augmentations
from clsp.train.cli import train
from clsp.train.data import ContrastiveStream, make_loader, open_shards
from clsp.train.positive_sources import OraclePartners
from clsp.train.recipes import ViewAugmentation
from support import TRAIN_ANCHORS, make_train_shards, unlabelled_train_shards

CPU_VIEWS = view_augmentations("simclr", {})
# full crops, no jitter, no greyscale, no flip: each view is the normalised image itself
IDENTITY = dataclasses.replace(ViewAugmentation(), crop_min_scale=1.0, jitter_p=0.0, grayscale_p=0.0, flip=False)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("source-shards"))


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def batches(shard_dir: Path, digits, source: str, *, seed: int = 0, epoch: int = 0, views=CPU_VIEWS,
            workers: int = 0, start_step: int = 0) -> list[dict]:
    stream = ContrastiveStream(open_shards(shard_dir), digits, batch_size=8, seed=seed, views=views,
                               num_workers=workers, source=source)
    stream.set_epoch(epoch, start_step)
    return list(make_loader(stream))


def test_self_positive_is_a_third_augmentation_of_the_anchor(shard_dir, digits):
    raw = batches(shard_dir, digits, "self", views=None)
    assert all(torch.equal(b["positive"], b["anchor"]) for b in raw)
    # identity views: view 3 is the anchor itself; the synthetic source's view 3 is not
    same = batches(shard_dir, digits, "self", views=(IDENTITY, IDENTITY))
    synthetic = batches(shard_dir, digits, "synthetic", views=(IDENTITY, IDENTITY))
    assert all(torch.allclose(b["x3"], b["x1"], atol=1e-5) for b in same)
    assert not any(torch.allclose(b["x3"], b["x1"], atol=1e-5) for b in synthetic)
    # METHOD.md's views: an independent draw, so view 3 differs from view 1 and view 2
    for b in batches(shard_dir, digits, "self"):
        assert not torch.equal(b["x3"], b["x1"]) and not torch.equal(b["x3"], b["x2"])


def test_oracle_positive_is_another_anchor_of_the_same_class(shard_dir, digits):
    labels = digits.labels()
    images = {a: digits.array([a])[0] for a in range(TRAIN_ANCHORS)}
    partners = []
    for epoch in range(3):
        picked = {}
        for b in batches(shard_dir, digits, "oracle", epoch=epoch, views=None):
            for anchor, positive in zip(b["index"].tolist(), b["positive"]):
                pixels = positive.numpy().transpose(1, 2, 0)
                found = [a for a, img in images.items() if np.array_equal(img, pixels)]
                assert len(found) == 1 and found[0] != anchor  # one of the run's anchors, never the anchor itself
                assert labels[found[0]] == labels[anchor]
                picked[anchor] = found[0]
        partners.append(picked)
    assert partners[0] != partners[1] != partners[2]  # drawn anew each epoch
    assert len({p for picked in partners for p in picked.values()}) > TRAIN_ANCHORS // 2  # spread over the class


def test_controls_keep_the_synthetic_runs_order_and_views_and_repeat_exactly(shard_dir, digits):
    synthetic = batches(shard_dir, digits, "synthetic", seed=3)
    for source in ("self", "oracle"):
        first = batches(shard_dir, digits, source, seed=3)
        # same anchors in the same order and the same two real views: only view 3 changes
        for a, b in zip(first, synthetic):
            assert torch.equal(a["index"], b["index"]) and torch.equal(a["x1"], b["x1"])
            assert torch.equal(a["x2"], b["x2"]) and not torch.equal(a["x3"], b["x3"])
        # two workers deliver what the same plan played in-process delivers, bit for bit
        split = ContrastiveStream(open_shards(shard_dir), digits, batch_size=8, seed=3, views=CPU_VIEWS,
                                  num_workers=2, source=source)
        in_process = ContrastiveStream(open_shards(shard_dir), digits, batch_size=8, seed=3, views=CPU_VIEWS,
                                       source=source)
        in_process.plan = split.plan
        pairs = list(zip(make_loader(split), make_loader(in_process), strict=True))
        assert all(torch.equal(a["index"], b["index"]) and torch.equal(a["x3"], b["x3"]) for a, b in pairs)
        resumed = batches(shard_dir, digits, source, seed=3, start_step=2)
        assert all(torch.equal(a["x3"], b["x3"]) for a, b in zip(first[2:], resumed))
        other = batches(shard_dir, digits, source, seed=4)
        assert not torch.equal(other[0]["x3"], first[0]["x3"])


def test_controls_read_no_shard_positives(shard_dir, digits):
    for source, reads in (("synthetic", True), ("self", False), ("oracle", False)):
        stream = ContrastiveStream(open_shards(shard_dir), digits, batch_size=8, views=None, source=source)
        assert (stream.decoded is not None) == reads


def test_oracle_needs_labels_and_two_anchors_per_class():
    with pytest.raises(UserError, match="needs a class label"):
        OraclePartners(np.arange(4), np.full(4, -1))
    with pytest.raises(UserError, match="class 2 has one"):
        OraclePartners(np.arange(5), np.array([0, 0, 2, 1, 1]))


@pytest.mark.parametrize("source,augment", [("synthetic", "cpu"), ("self", "device"), ("oracle", "cpu")])
def test_clsp_train_runs_with_each_source(shard_dir, tmp_path, source, augment):
    out = tmp_path / source
    result = CliRunner().invoke(train, [
        "--shards", str(shard_dir), "--out", str(out), "--positive-source", source, "--augment", augment,
        "--clsp-lambda", "0.5", "--epochs", "1", "--backbone", "resnet-narrow", "--batch-size", "8", "--workers", "0",
        "--precision", "fp32", "--proj-hidden-dim", "64", "--proj-output-dim", "32"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["settings"]["positive_source"] == source and summary["steps"] == TRAIN_ANCHORS // 8
    assert summary["final"]["loss_clsp"] > 0  # view 3 was trained on


def test_oracle_without_labels_is_one_error_line(tmp_path, digits):
    shards = unlabelled_train_shards(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(train, [
        "--shards", str(shards), "--out", str(out), "--positive-source", "oracle", "--clsp-lambda", "1",
        "--epochs", "1", "--backbone", "resnet-narrow", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
        "--data-root", str(tmp_path)])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "needs a class label" in errors[0], result.output
    assert not out.exists()
