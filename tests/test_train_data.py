"""Training data: shards -> anchors and positives -> augmented views, per rank and worker."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from clsp.config import parse
from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.shards import schema
from clsp.train.augment import DeviceAugment, augment_images, cpu_transform, view_augmentations
from clsp.train.config import TrainJob
from clsp.train.data import ContrastiveStream, make_loader, open_shards, plan_epoch
from clsp.train.recipes import ViewAugmentation
from support import TRAIN_ANCHORS, TRAIN_K, fabricated_positives, make_train_shards

CPU_VIEWS = view_augmentations("simclr", {})  # views on CPU workers; views=None: raw images for the device

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits")


def collect(stream: ContrastiveStream) -> list[dict]:
    return list(make_loader(stream))


def test_cpu_views_shapes_normalisation_and_per_sample_randomness(digits):
    images = torch.from_numpy(np.repeat(digits.array([5])[None], 64, 0)[:, 0].transpose(0, 3, 1, 2).copy())
    torch.manual_seed(0)
    views = augment_images(cpu_transform(16, digits.mean, digits.std, ViewAugmentation()), images)
    assert views.shape == (64, 3, 16, 16) and views.dtype == torch.float32
    # same image, independent draws: views differ from one another
    assert len({v.numpy().tobytes() for v in views}) > 32
    # normalised: the black background maps to -mean/std
    black = -torch.tensor(digits.mean) / torch.tensor(digits.std)
    assert torch.allclose(views.amin(dim=(0, 2, 3)), black, atol=0.2)


def test_device_views_draw_parameters_per_sample(digits):
    images = torch.from_numpy(np.repeat(digits.array([5]), 64, 0).transpose(0, 3, 1, 2).copy())
    torch.manual_seed(0)
    views = DeviceAugment(16, digits.mean, digits.std, ViewAugmentation())(images)
    assert views.shape == (64, 3, 16, 16) and views.dtype == torch.float32
    assert len({v.numpy().tobytes() for v in views}) > 32
    # one sample's parameters do not leak to another: flips, crops and greyscale differ across the batch
    flipped = torch.flip(views, dims=[3])
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(flipped[0], views[1])
    mean, std = torch.tensor(digits.mean)[:, None, None], torch.tensor(digits.std)[:, None, None]
    identity = (images.float() / 255 - mean) / std
    assert abs(views.mean().item() - identity.mean().item()) < 0.5  # same normalisation as the CPU path


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_no_flip_and_full_crops_keep_the_image_whole_and_the_right_way_round(digits, augment):
    # left half white, right half black: jitter and greyscale keep white brighter than black, so
    # which side is brighter tells whether a view was mirrored, and a sharp edge between columns
    # 7 and 8 tells that the crop kept the whole image
    images = torch.zeros(20, 3, 16, 16, dtype=torch.uint8)
    images[..., :8] = 255

    def views(crop_min_scale: float, flip: bool) -> torch.Tensor:
        torch.manual_seed(0)
        view = ViewAugmentation(crop_min_scale=crop_min_scale, flip=flip)
        if augment == "cpu":
            return augment_images(cpu_transform(16, digits.mean, digits.std, view), images)
        return DeviceAugment(16, digits.mean, digits.std, view)(images)

    def left_brighter(v: torch.Tensor) -> torch.Tensor:
        return v[..., :8].mean(dim=(1, 2, 3)) > v[..., 8:].mean(dim=(1, 2, 3))

    def edge_in_the_middle(v: torch.Tensor) -> torch.Tensor:
        return (v[..., 7] - v[..., 8]).mean(dim=(1, 2)) > 1.0

    whole = views(1.0, flip=False)
    assert left_brighter(whole).all() and edge_in_the_middle(whole).all()
    mirrored = (~left_brighter(views(1.0, flip=True))).sum().item()
    assert 0 < mirrored < 20  # a fair coin per view, not one draw for the batch
    assert not edge_in_the_middle(views(0.08, flip=False)).all()  # METHOD.md's small crops move or lose the edge


def test_crop_min_scale_outside_0_1_is_refused(tmp_path):
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="--crop-min-scale"):
            parse(TrainJob, {"shards": str(tmp_path), "out": str(tmp_path / "out"), "crop_min_scale": bad})
    assert parse(TrainJob, {"shards": str(tmp_path), "out": str(tmp_path / "out"), "crop_min_scale": 1.0})


@pytest.mark.parametrize("world_size,batch_size", [(1, 8), (2, 4), (2, 5)])
def test_an_epoch_covers_each_anchor_once_across_ranks(shard_dir, world_size, batch_size):
    shards = open_shards(shard_dir)
    per_rank = [np.concatenate([plan.anchors(s) for s in range(len(plan.batches))])
                for plan in (plan_epoch(shards, seed=3, epoch=1, batch_size=batch_size, rank=r,
                                        world_size=world_size, num_workers=2) for r in range(world_size))]
    assert len({len(seen) for seen in per_rank}) == 1  # every rank runs the same number of steps
    seen = np.concatenate(per_rank)
    assert len(set(seen.tolist())) == len(seen)  # no anchor twice
    expected = TRAIN_ANCHORS // (world_size * batch_size) * world_size * batch_size
    assert len(seen) == expected  # all of them when divisible, else the tail of < world*batch is dropped
    if expected == TRAIN_ANCHORS:
        assert sorted(seen.tolist()) == list(range(TRAIN_ANCHORS))


def test_order_changes_with_epoch_and_dropped_tail_differs(shard_dir):
    shards = open_shards(shard_dir)
    plans = [plan_epoch(shards, seed=0, epoch=e, batch_size=6) for e in range(3)]
    seen = [set(np.concatenate(p.chunks).tolist()) for p in plans]
    dropped = [frozenset(range(TRAIN_ANCHORS)) - s for s in seen]
    assert all(len(d) == TRAIN_ANCHORS % 6 for d in dropped)
    assert len(set(dropped)) > 1
    assert not np.array_equal(plans[0].anchors(0), plans[1].anchors(0))


def test_workers_split_without_duplicates_and_give_the_batches_made_in_process(shard_dir, digits):
    shards = open_shards(shard_dir)
    kw = dict(batch_size=4, seed=1, views=CPU_VIEWS)
    with_workers = ContrastiveStream(shards, digits, num_workers=2, **kw)
    batches = collect(with_workers)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert len(batches) == with_workers.steps == TRAIN_ANCHORS // 4
    assert sorted(indices) == list(range(TRAIN_ANCHORS))
    first = batches[0]
    assert first["x1"].shape == first["x3"].shape == (4, 3, 16, 16)
    assert torch.equal(first["label"], torch.from_numpy(digits.labels()[first["index"].numpy()]))
    # in-process, the same batches bit for bit, in the same order: the number of workers is a speed setting
    again = collect(ContrastiveStream(shards, digits, num_workers=0, **kw))
    assert len(again) == len(batches)
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(batches, again))


def test_positive_is_one_of_the_candidates_drawn_anew_each_epoch(shard_dir, digits):
    shards = open_shards(shard_dir)
    stream = ContrastiveStream(shards, digits, batch_size=8, views=None)
    drawn = []
    for epoch in range(4):
        stream.set_epoch(epoch)
        picks = {}
        for batch in collect(stream):
            for a, anchor, positive in zip(batch["index"].tolist(), batch["anchor"], batch["positive"]):
                img = digits.array([a])[0]
                assert torch.equal(anchor, torch.from_numpy(img.transpose(2, 0, 1).copy()))
                candidates = fabricated_positives(img, a)
                matches = [j for j in range(TRAIN_K)
                           if np.array_equal(positive.numpy().transpose(1, 2, 0), candidates[j])]
                assert len(matches) == 1
                picks[a] = matches[0]
        drawn.append(picks)
    counts = Counter(j for picks in drawn for j in picks.values())
    assert set(counts) == set(range(TRAIN_K))  # every candidate gets used
    assert any(drawn[0][a] != drawn[1][a] for a in drawn[0])  # a fresh draw per epoch


def test_resume_skips_done_steps_exactly(shard_dir, digits):
    shards = open_shards(shard_dir)
    stream = ContrastiveStream(shards, digits, batch_size=4, views=CPU_VIEWS, num_workers=2, seed=5)
    stream.set_epoch(2)
    full = collect(stream)
    stream.set_epoch(2, start_step=3)
    rest = collect(stream)
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a["x1"], b["x1"]) for a, b in zip(full[3:], rest))


def test_baseline_reads_no_positives(shard_dir, digits):
    stream = ContrastiveStream(open_shards(shard_dir), digits, batch_size=8, views=CPU_VIEWS, positives=False)
    batch = next(iter(make_loader(stream)))
    assert "x3" not in batch and batch["x1"].shape == (8, 3, 16, 16)


def test_incomplete_shard_set_is_refused_unless_partial(tmp_path, digits):
    directory = make_train_shards(tmp_path / "partial", shards=[0, 2])
    with pytest.raises(UserError, match="--allow-partial"):
        open_shards(directory)
    shards = open_shards(directory, allow_partial=True)
    stream = ContrastiveStream(shards, digits, batch_size=4, views=None)
    seen = sorted(torch.cat([b["index"] for b in collect(stream)]).tolist())
    assert seen == list(range(0, 12)) + list(range(24, 36))


def test_shard_anchor_is_used_when_the_shard_holds_it(tmp_path, digits):
    directory = make_train_shards(tmp_path / "with-anchor", num_anchors=8, shard_size=8, with_anchor=True)
    stream = ContrastiveStream(open_shards(directory), digits, batch_size=8, views=None)
    batch = next(iter(make_loader(stream)))
    anchors = digits.array(batch["index"].numpy()).transpose(0, 3, 1, 2).copy()
    assert torch.equal(batch["anchor"], torch.from_numpy(anchors))


def test_bad_shard_directories_and_batches_are_one_line_errors(tmp_path, shard_dir, digits):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no manifest"):
        open_shards(tmp_path / "empty")
    unverified = make_train_shards(tmp_path / "bad", num_anchors=12, shard_size=12)
    tar = unverified / schema.shard_name(0)
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: the file no longer matches its record
    tar.write_bytes(bytes(data))
    with pytest.raises(UserError, match="no finished shard that passes verification"):
        open_shards(unverified)
    with pytest.raises(UserError, match="larger than the 40 anchors"):
        ContrastiveStream(open_shards(shard_dir), digits, batch_size=32, world_size=2)
