"""Training batches streamed from the shards: two views of each real anchor, one of a synthetic positive.

The order of an epoch is a pure function of ``(seed, epoch)`` and the shard set, so every rank
computes it alone, DataLoader workers split it without duplicates, and a resumed run replays it:

1. All anchors of the usable shards are permuted with ``(seed, epoch)``: one shuffle over the whole
   epoch, so a batch mixes anchors from everywhere (a class-sorted folder still gives mixed batches).
2. Every rank runs ``steps = N // (world * batch)`` steps. Rank ``r`` takes the contiguous block
   ``stream[r * steps * batch : (r + 1) * steps * batch]`` of that order. The tail of fewer than
   ``world * batch`` anchors is dropped, like ``DistributedSampler(drop_last=True)``; it is the end of
   a shuffled order, so a different tail each epoch.
3. Step ``s`` of a rank is batch ``s`` of its block, whatever the number of DataLoader workers (a speed
   setting: the batches are the same for any number). Worker ``w`` delivers steps ``w, w + W, ...``, the
   DataLoader's round-robin order, and its chunk holds those batches' anchors: it takes the positives they
   drew from the decoded shards (``clsp.train.decoded_cache``) in one read; the first epoch reads and decodes
   the rows of its anchors, later epochs index arrays.

Each anchor's positive is one of its k candidates, chosen from one uniform draw per ``(seed, epoch)``
by the positive-choice policy (uniform as METHOD.md; top-m or score-weighted by the stored scores), and the
augmentation of step ``s`` is seeded with ``(seed, epoch, rank, s)``: batch contents never depend
on timing, and skipping the first ``s`` steps of an epoch reproduces the rest of it exactly. A control
positive source (``clsp.train.positive_sources``) fills the positive from the anchor itself or from a
same-class anchor drawn per ``(seed, epoch)``, with the same plan and seeds, and decodes no shard positives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clsp.datasets import ImageDataset
from clsp.errors import UserError
from clsp.shards import reader
from clsp.train.augment import augment_images, cpu_transform
from clsp.train.decoded_cache import DecodedShards
from clsp.train.positive_choice import POSITIVE_CHOICES
from clsp.train.positive_sources import POSITIVE_SOURCES, OraclePartners
from clsp.train.recipes import ViewAugmentation


@dataclass(frozen=True)
class ShardSet:
    """The verified shards of a directory and the anchors each holds."""

    store: reader.ShardDirectory
    shards: tuple[int, ...]
    held_out: frozenset[int] = frozenset()  # validation anchors (clsp.datasets.validation_indices): never trained on

    @property
    def directory(self) -> str:
        return self.store.path

    @property
    def manifest(self) -> dict:
        """The validated manifest as JSON data, as run summaries record it."""
        return self.store.manifest.model_dump(mode="json")

    @property
    def shard_size(self) -> int:
        return self.store.manifest.shard_size

    def anchors(self, shard: int) -> range:
        return self.store.anchor_range(shard)

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_indices())

    def anchor_indices(self) -> np.ndarray:
        """Every anchor of the usable shards that is not held out, in shard order."""
        anchors = np.concatenate([np.arange(r.start, r.stop) for r in map(self.anchors, self.shards)])
        return anchors[~np.isin(anchors, list(self.held_out))] if self.held_out else anchors


def open_shards(directory: str | Path, *, allow_partial: bool = False) -> ShardSet:
    """The shards that pass verification; refuses a directory with none, or with gaps unless allowed."""
    store = reader.ShardDirectory.open(directory)
    expected = store.num_shards
    done = store.verified_shards()
    if not done:
        raise UserError(f"{directory} has no finished shard that passes verification; generate the positives "
                        f"with clsp-gen (`clsp shards verify {directory}` shows what is wrong)")
    missing = sorted(set(range(expected)) - done)
    shards = ShardSet(store, tuple(sorted(done)))
    if missing and not allow_partial:
        uncovered = store.manifest.num_anchors - shards.num_anchors
        raise UserError(f"{len(missing)} of {expected} shards in {directory} are missing or fail verification "
                        f"(first: shard {missing[0]}), so {uncovered} anchors have no positives; finish them "
                        f"with clsp-gen, or pass --allow-partial to train on the {shards.num_anchors} covered anchors")
    return shards


def steps_per_epoch(num_anchors: int, batch_size: int, world_size: int) -> int:
    """Steps every rank runs per epoch (the tail of fewer than ``world * batch`` anchors is dropped)."""
    return num_anchors // (batch_size * world_size)


def step_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The augmentation seed of one step of one rank (independent of workers and of resumption)."""
    return int(np.random.SeedSequence([seed, epoch, rank, step]).generate_state(1)[0])


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: chunks of anchors and the batches in the order the DataLoader delivers them."""

    chunks: list[np.ndarray]
    batches: list[tuple[int, int]]  # (chunk, offset of the batch in the chunk), in delivered order
    batch_size: int

    def anchors(self, step: int) -> np.ndarray:
        chunk, offset = self.batches[step]
        return self.chunks[chunk][offset:offset + self.batch_size]


def plan_epoch(shards: ShardSet, *, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
               num_workers: int = 0) -> EpochPlan:
    """This rank's anchors for one epoch (see the module docstring for the scheme)."""
    anchors = shards.anchor_indices()
    stream = anchors[np.random.default_rng([seed, epoch]).permutation(len(anchors))]
    steps = steps_per_epoch(len(stream), batch_size, world_size)
    block = stream[rank * steps * batch_size:(rank + 1) * steps * batch_size]
    workers = max(1, num_workers)
    batches = [block[s * batch_size:(s + 1) * batch_size] for s in range(steps)]
    chunks = [np.concatenate(batches[w::workers]) for w in range(min(workers, steps))]
    delivered = [(s % workers, s // workers * batch_size) for s in range(steps)]
    return EpochPlan(chunks, delivered, batch_size)


class ContrastiveStream(IterableDataset):
    """Whole training batches for one rank, streamed from the shards (use with ``make_loader``).

    Each batch is a dict: ``index`` and ``label`` (int64 ``[B]``), and either the augmented views
    ``x1``, ``x2``, ``x3`` (``views`` given: the two real views' lists, augmented here on the CPU into
    normalised float32 ``[B, 3, S, S]``) or the raw ``anchor`` and ``positive`` images (``views`` None:
    uint8 ``[B, 3, H, W]``, augmented later on the device by ``DeviceAugment``). Without ``positives`` (the
    CLSP weight is 0) the shards only fix the anchor set and no positive is read. ``source`` says what the
    positive is (``clsp.train.positive_sources``); only ``synthetic`` reads the shards' positives. Decoded
    shards are kept in memory, or under ``cache_dir`` when given. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, shards: ShardSet, dataset: ImageDataset, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, positives: bool = True,
                 views: tuple[ViewAugmentation, ViewAugmentation] | None = None, choice: str = "uniform",
                 choice_params: dict | None = None, cache_dir: str | Path | None = None,
                 source: str = "synthetic") -> None:
        super().__init__()
        need = batch_size * world_size
        if shards.num_anchors < need:
            raise UserError(f"a global batch of {need} ({world_size} x {batch_size}) is larger than the "
                            f"{shards.num_anchors} anchors in {shards.directory}; pass a smaller --batch-size")
        self.shards, self.dataset = shards, dataset
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.positives = num_workers, positives
        self.choice, self.choice_params = choice, choice_params or {}
        self.labels = dataset.labels()
        size = dataset.image_size
        self.transforms = None if views is None else \
            tuple(cpu_transform(size, dataset.mean, dataset.std, view) for view in views)
        if source not in POSITIVE_SOURCES:
            raise ValueError(f"unknown positive source {source!r}; one of {', '.join(POSITIVE_SOURCES)}")
        self.source = source
        # made here, in the process that starts the workers: forked workers share its pages
        self.decoded = DecodedShards(shards, cache_dir) if positives and source == "synthetic" else None
        self.oracle = OraclePartners(shards.anchor_indices(), self.labels) if positives and source == "oracle" \
            else None
        self.epoch, self.start_step = 0, 0

    @property
    def steps(self) -> int:
        return steps_per_epoch(self.shards.num_anchors, self.batch_size, self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch, skipping its first ``start_step`` steps (already done before a resume)."""
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def plan(self) -> EpochPlan:
        return plan_epoch(self.shards, seed=self.seed, epoch=self.epoch, batch_size=self.batch_size, rank=self.rank,
                          world_size=self.world_size, num_workers=self.num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan()
        # the DataLoader asks workers round-robin, so worker w delivers every workers-th remaining step
        mine = list(range(self.start_step + worker, len(plan.batches), workers))
        last_use = {plan.batches[s][0]: s for s in mine}
        loaded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}
        for step in mine:
            chunk, offset = plan.batches[step]
            if chunk not in loaded:
                loaded[chunk] = self._read_chunk(plan.chunks[chunk])
            rows = slice(offset, offset + self.batch_size)
            arrays = loaded[chunk]
            part = None if arrays is None else (arrays[0][rows], arrays[1][rows], arrays[2][rows])
            yield self._batch(plan.anchors(step), part, step)
            if last_use[chunk] == step:
                del loaded[chunk]

    def _read_chunk(self, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The positive each anchor drew this epoch, its image from the shard and a mask of the anchors
        whose shard holds one (None without positives), aligned with ``anchors``; from the decoded cache."""
        if self.decoded is None:
            return None
        draws = np.random.default_rng([self.seed, self.epoch, 1]).random(self.shards.store.manifest.num_anchors)
        if self.choice == "uniform":  # METHOD.md's draw: int(draw * k), no scores read
            return self.decoded.drawn(anchors, draws[anchors])
        params = self.choice_params
        return self.decoded.drawn(anchors, draws[anchors],
                                  lambda u, scores, k: POSITIVE_CHOICES[self.choice](u, scores, k, **params))

    def _batch(self, anchors: np.ndarray, part: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
               step: int) -> dict[str, torch.Tensor]:
        images = self._anchor_images(anchors, part)
        batch = {"index": torch.from_numpy(anchors.astype(np.int64)),
                 "label": torch.from_numpy(self.labels[anchors])}
        positive = self._positive_images(anchors, part, images)
        if self.transforms is None:
            batch["anchor"] = images
            if positive is not None:
                batch["positive"] = positive
            return batch
        first, second = self.transforms
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed(self.seed, self.epoch, self.rank, step))
            batch["x1"] = augment_images(first, images)
            batch["x2"] = augment_images(second, images)
            if positive is not None:  # the synthetic view gets view 1's list (METHOD.md section 3)
                batch["x3"] = augment_images(first, positive)
        return batch

    def _positive_images(self, anchors: np.ndarray, part: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                         images: torch.Tensor) -> torch.Tensor | None:
        """The uint8 positive of each anchor from this run's source (None without positives)."""
        if not self.positives:
            return None
        if self.source == "self":
            return images
        if self.source == "oracle":
            if self.oracle is None:
                raise AssertionError("a stream with oracle positives makes its partners when it is made")
            return _chw(self.dataset.array(self.oracle.partners(anchors, self.seed, self.epoch)))
        if part is None:
            raise AssertionError("synthetic positives come with their chunk from the decoded shards")
        return _chw(part[0])

    def _anchor_images(self, anchors: np.ndarray, part: tuple[np.ndarray, np.ndarray, np.ndarray] | None
                       ) -> torch.Tensor:
        """The real anchors: from the shard where it holds them, else from the dataset by index."""
        if part is None:
            return _chw(self.dataset.array(anchors))
        _, images, stored = part
        if stored.all():
            return _chw(images)
        images = images.copy()
        lacking = np.flatnonzero(~stored)
        images[lacking] = self.dataset.array(anchors[lacking])
        return _chw(images)


def _chw(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> contiguous uint8 ``[B, 3, H, W]``."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def make_loader(stream: ContrastiveStream, *, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream of whole batches (workers as the stream was planned for)."""
    workers = stream.num_workers
    return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
