"""The decoded-shard cache and the device-resident dataset return exactly the shards' pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clsp.datasets import ArrayDataset
from clsp.errors import ShardError, UserError
from clsp.shards import reader, schema, writer
from clsp.train.data import ContrastiveStream, make_loader, open_shards
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
    for shard in range(manifest.num_shards):
        writer.write_shard(directory, shard, (
            schema.ShardSample(anchor_index=a, positives=positives[a], label=int(dataset.targets[a]),
                               anchor=dataset.images[a] if store_anchors else None)
            for a in manifest.anchor_range(shard)))
    return positives


@pytest.fixture
def shards(tmp_path: Path):
    dataset = _dataset()
    positives = _write(tmp_path / "shards", dataset, store_anchors=False)
    return open_shards(tmp_path / "shards"), dataset, positives


def _refuse_reads(monkeypatch) -> None:
    def refuse(self, shard_index):
        raise AssertionError(f"read shard {shard_index} although it is decoded")

    monkeypatch.setattr(reader.ShardDirectory, "read_records", refuse)


def test_decoded_positives_equal_the_shard_reader(shards):
    shard_set, _, written = shards
    from_reader = np.stack([s.positives for s in shard_set.store.samples()])
    index, positives = DecodedShards(shard_set).arrays()
    assert np.array_equal(index, np.arange(ANCHORS))
    assert np.array_equal(positives, from_reader) and np.array_equal(positives, written)
    order = np.array([25, 3, 14, 0, 9, 10, 3])  # across shards, out of order, repeated
    assert np.array_equal(DecodedShards(shard_set).positives(order), written[order])


def test_first_read_decodes_the_drawn_candidate_the_next_read_the_rest(shards, monkeypatch):
    shard_set, _, written = shards
    decoded = DecodedShards(shard_set)
    rows = np.array([12, 4, 13])
    positives, _, stored = decoded.drawn(rows, np.array([0.0, 0.5, 0.99]))
    assert np.array_equal(positives, written[rows, [0, 1, 2]]) and not stored.any()
    one, zero = decoded._shards[1], decoded._shards[0]
    assert one.done[[2, 3]].tolist() == [[1, 0, 0], [0, 0, 1]] and zero.done[4].tolist() == [0, 1, 0]
    assert one.state[[2, 3]].tolist() == [2, 2] and one.state[[0, 1, 4]].sum() == 0
    assert decoded._shards[2].state.sum() == 0  # a shard none of whose anchors was asked for is not read
    with monkeypatch.context() as patch:
        _refuse_reads(patch)
        assert np.array_equal(decoded.drawn(rows, np.array([0.1, 0.4, 0.8]))[0], positives)
    again, _, _ = decoded.drawn(rows, np.array([0.7, 0.0, 0.34]))  # read again: every candidate of the rows
    assert np.array_equal(again, written[rows, [2, 0, 1]])
    assert one.done[[2, 3]].all() and zero.done[4].all() and one.done[[0, 1, 4]].sum() == 0
    _refuse_reads(monkeypatch)
    assert np.array_equal(decoded.positives(rows), written[rows])


def test_cache_files_are_reused_without_reading_the_shards(shards, tmp_path: Path, monkeypatch):
    shard_set, _, written = shards
    cache = tmp_path / "cache"
    DecodedShards(shard_set, cache).arrays()
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert len(files) == 4 * len(shard_set.shards) and all(f.startswith("v2-shard-") for f in files)
    _refuse_reads(monkeypatch)
    again = DecodedShards(shard_set, cache)
    assert np.array_equal(again.arrays()[1], written)
    assert isinstance(again._shards[0].positives, np.memmap)


def test_cache_files_are_never_unpickled_and_a_wrong_one_is_refused(shards, tmp_path: Path):
    shard_set, _, _ = shards
    cache = tmp_path / "cache"
    DecodedShards(shard_set, cache).positives(np.array([0]))
    state = next(cache.glob("*-shard-000000-*.state.npy"))
    np.save(state, np.array([object()] * SHARD_SIZE), allow_pickle=True)
    with pytest.raises(UserError, match="delete it"):
        DecodedShards(shard_set, cache).positives(np.array([0]))
    np.save(state, np.zeros(SHARD_SIZE + 1, np.uint8))
    with pytest.raises(UserError, match="not uint8"):
        DecodedShards(shard_set, cache).positives(np.array([0]))


def test_a_shard_altered_after_opening_is_refused_not_decoded(shards):
    shard_set, _, _ = shards
    path = Path(shard_set.store.shard_path(1))  # a local store: its location is a path
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF
    path.write_bytes(bytes(data))
    decoded = DecodedShards(shard_set)
    assert decoded.positives(np.array([0])).shape == (1, K, SIZE, SIZE, 3)
    with pytest.raises(ShardError, match="damaged or altered"):
        decoded.positives(np.array([10]))


def test_over_the_memory_budget_each_read_decodes_only_what_it_draws(shards):
    shard_set, _, written = shards
    with pytest.warns(UserWarning, match="decodes the positives it draws"):
        decoded = DecodedShards(shard_set, memory_limit=1)
    assert not decoded.keeps and not decoded._shards
    rows, draws = np.array([25, 3, 14, 3]), np.array([0.1, 0.4, 0.7, 0.9])
    assert np.array_equal(decoded.drawn(rows, draws)[0], written[rows, (draws * K).astype(int)])
    assert np.array_equal(decoded.positives(rows), written[rows])


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_decodes_what_it_draws_and_shares_it_across_workers_and_epochs(shards, monkeypatch, workers):
    shard_set, dataset, written = shards
    stream = ContrastiveStream(shard_set, dataset, batch_size=2, seed=5, num_workers=workers)  # 26 = 13 x 2
    draws = [np.random.default_rng([5, epoch, 1]).random(ANCHORS) for epoch in (0, 1)]
    first = list(make_loader(stream))
    assert sorted(torch.cat([b["index"] for b in first]).tolist()) == list(range(ANCHORS))
    state = np.concatenate([stream.decoded._shards[s].state for s in shard_set.shards])
    done = np.concatenate([stream.decoded._shards[s].done for s in shard_set.shards])
    assert (state == 2).all() and (done.sum(1) == 1).all()  # the workers' decoding reached this process
    with monkeypatch.context() as patch:  # the same epoch again: arrays only
        _refuse_reads(patch)
        assert all(torch.equal(a[key], b[key]) for a, b in zip(first, make_loader(stream)) for key in a)
    stream.set_epoch(1)
    for batch in make_loader(stream):
        anchors = batch["index"].numpy()
        expected = written[anchors, (draws[1][anchors] * K).astype(int)]
        assert torch.equal(batch["positive"], torch.from_numpy(expected).permute(0, 3, 1, 2))
        assert torch.equal(batch["anchor"], torch.from_numpy(dataset.images[anchors]).permute(0, 3, 1, 2))
    done = np.concatenate([stream.decoded._shards[s].done for s in shard_set.shards])
    assert done.all()  # the second epoch read each shard again, so its rows are whole: later epochs read none
    assert ((draws[0] * K).astype(int) == (draws[1] * K).astype(int)).any()  # even rows drawn alike twice


def test_stored_anchors_only_when_the_shards_hold_them(shards, tmp_path: Path):
    shard_set, dataset, _ = shards
    assert DecodedShards(shard_set).stored_anchors(np.arange(4)) is None
    _write(tmp_path / "with-anchors", dataset, store_anchors=True)
    for cache in (None, tmp_path / "cache"):
        with_anchors = DecodedShards(open_shards(tmp_path / "with-anchors"), cache)
        rows = np.array([21, 2, 13])
        assert np.array_equal(with_anchors.stored_anchors(rows), dataset.images[rows])


def test_device_dataset_batches_hold_the_shard_pixels_and_repeat_from_a_seed(shards):
    shard_set, dataset, written = shards
    data = DeviceDataset.from_decoded(DecodedShards(shard_set), dataset, "cpu")
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
