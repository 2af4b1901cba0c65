"""The decoded-shard cache and the device-resident dataset return exactly the shards' pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clsp.datasets import ArrayDataset
from clsp.shards import reader, schema, writer
from clsp.train import decoded_cache
from clsp.train.data import ContrastiveStream, open_shards
from clsp.train.decoded_cache import DecodedShards
from clsp.train.device_data import DeviceDataset

ANCHORS, K, SIZE, SHARD_SIZE = 26, 3, 8, 10


def _dataset() -> ArrayDataset:
    rng = np.random.default_rng(1)
    return ArrayDataset(name="synthetic", split="train", num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3,
                        images=rng.integers(0, 256, (ANCHORS, SIZE, SIZE, 3), dtype=np.uint8),
                        targets=np.arange(ANCHORS) % 4)


def _write(directory: Path, dataset: ArrayDataset, *, store_anchors: bool) -> np.ndarray:
    """Shards of every anchor with K random positives; returns the positives written."""
    positives = np.random.default_rng(2).integers(0, 256, (ANCHORS, K, SIZE, SIZE, 3), dtype=np.uint8)
    manifest = writer.init_manifest(directory, dataset=dataset.describe(), generation={"test": True},
                                    num_anchors=ANCHORS, shard_size=SHARD_SIZE)
    for shard in range(writer.num_shards(manifest)):
        writer.write_shard(directory, shard, (
            schema.ShardSample(anchor_index=a, positives=positives[a], label=int(dataset.targets[a]),
                               anchor=dataset.images[a] if store_anchors else None)
            for a in writer.shard_anchor_range(manifest, shard)))
    return positives


@pytest.fixture
def shards(tmp_path: Path):
    dataset = _dataset()
    positives = _write(tmp_path / "shards", dataset, store_anchors=False)
    return open_shards(tmp_path / "shards"), dataset, positives


def test_decoded_positives_equal_the_shard_reader(shards):
    shard_set, _, written = shards
    indices, from_reader = reader.load_positives(shard_set.directory)
    index, positives = DecodedShards.load(shard_set).arrays()
    assert np.array_equal(index, indices) and np.array_equal(index, np.arange(ANCHORS))
    assert np.array_equal(positives, from_reader)
    assert np.array_equal(positives, written)
    order = np.array([25, 3, 14, 0, 9, 10])  # across shards, out of order
    assert np.array_equal(DecodedShards.load(shard_set).positives(order), written[order])


def test_cache_files_are_reused_without_decoding(shards, tmp_path: Path, monkeypatch):
    shard_set, _, written = shards
    cache = tmp_path / "cache"
    DecodedShards.load(shard_set, cache, eager=True)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == len(shard_set.shards) and all(f.endswith(".positives.npy") for f in files)

    def refuse(path):
        raise AssertionError(f"decoded {path} although its cache file exists")

    monkeypatch.setattr(decoded_cache, "decode_shard", refuse)
    again = DecodedShards.load(shard_set, cache)
    assert np.array_equal(again.arrays()[1], written)
    assert isinstance(again._shard(0)[0], np.memmap)


def test_drawn_positive_is_the_one_the_stream_draws(shards):
    shard_set, dataset, _ = shards
    stream = ContrastiveStream(shard_set, dataset, batch_size=8, seed=5, augment="device", mix_anchors=16)
    stream.set_epoch(2)
    decoded = DecodedShards.load(shard_set)
    draws = np.random.default_rng([5, 2, 1]).random(ANCHORS)
    batches = list(stream)
    assert batches
    for batch in batches:
        anchors = batch["index"].numpy()
        drawn = decoded.drawn(anchors, draws[anchors])
        assert torch.equal(batch["positive"], torch.from_numpy(drawn).permute(0, 3, 1, 2))


def test_stored_anchors_only_when_the_shards_hold_them(shards, tmp_path: Path):
    shard_set, dataset, _ = shards
    assert DecodedShards.load(shard_set).stored_anchors(np.arange(4)) is None
    _write(tmp_path / "with-anchors", dataset, store_anchors=True)
    with_anchors = DecodedShards.load(open_shards(tmp_path / "with-anchors"), tmp_path / "cache")
    rows = np.array([21, 2, 13])
    assert np.array_equal(with_anchors.stored_anchors(rows), dataset.images[rows])


def test_device_dataset_batches_hold_the_shard_pixels_and_repeat_from_a_seed(shards):
    shard_set, dataset, written = shards
    data = DeviceDataset.from_decoded(DecodedShards.load(shard_set), dataset, "cpu")
    assert len(data) == ANCHORS and data.candidates == K and data.nbytes == ANCHORS * (K + 1) * SIZE * SIZE * 3
    rows = torch.tensor([7, 0, 25, 12, 7])
    batch = data.batch(rows, torch.Generator().manual_seed(3))
    assert torch.equal(batch["anchor"], torch.from_numpy(dataset.images[rows.numpy()]).permute(0, 3, 1, 2))
    assert torch.equal(batch["label"], torch.from_numpy(dataset.targets[rows.numpy()]))
    for row, positive in zip(rows.tolist(), batch["positive"]):
        assert any(torch.equal(positive, torch.from_numpy(c).permute(2, 0, 1)) for c in written[row])

    def epoch(seed: int) -> list[dict]:
        return list(data.batches(8, torch.Generator().manual_seed(seed)))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == ANCHORS // 8
    seen = torch.cat([b["index"] for b in first])
    assert len(set(seen.tolist())) == len(seen)  # an epoch visits each row at most once
    assert all(torch.equal(a[key], b[key]) for a, b in zip(first, again) for key in a)
    assert not all(torch.equal(a["positive"], b["positive"]) for a, b in zip(first, other))


def test_device_dataset_refuses_mismatched_arrays():
    with pytest.raises(ValueError, match="disagree"):
        DeviceDataset(np.zeros((4, 2, 2, 3), np.uint8), np.zeros((3, 1, 2, 2, 3), np.uint8), np.zeros(4), "cpu")
