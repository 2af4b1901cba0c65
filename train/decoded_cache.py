"""Shards decoded once into uint8 arrays, so later epochs index arrays instead of decoding PNGs.

Decoding an anchor's k PNG positives costs far more than everything else the data path does per
anchor. ``DecodedShards`` keeps, per verified shard, ``positives`` uint8 ``[n, k, H, W, 3]`` with a flag
per candidate (``done`` ``[n, k]``), the stored real ``anchors`` uint8 ``[n, H, W, 3]`` and a ``state``
per row (0: never read, 1: read, with its stored anchor, 2: read, the shard holds no anchor image).
Flags and states are written after the pixels they declare, so whatever they declare is complete.

What is decoded: the first time a row is asked for, only the candidates asked for (the one the epoch
drew) and its anchor, so the first epoch decodes one PNG positive per anchor. When a shard has to be
read again (a candidate asked for is not decoded yet), every row of that request read before gets all
its remaining candidates. The stream asks once per worker chunk, which holds all of the worker's
anchors of an epoch, so the second epoch completes its rows and later epochs read no shard; reading a
shard again for each missing candidate would instead cost a sha256, a tar read and the records in
almost every epoch until all k had been drawn.

Where the arrays live:

- in memory (the default): one anonymous shared mapping, made by the process that builds the cache.
  DataLoader workers forked from it write the rows they decode into the same pages, so the next
  epoch's workers find them decoded. A cache larger than its share of the physical memory is not
  kept: each read then decodes only the drawn candidates (``keeps`` is False).
- under ``cache_dir``: ``.npy`` files opened as memory maps, shared by workers, ranks on the same
  machine and later runs. A file's name holds the shard's sha256 from the manifest, so a regenerated
  shard never reuses stale pixels; pixels are flushed to the file before the states that declare them.

Shards are read only through ``ShardDirectory.read_records``: a shard is verified against its
manifest record (size and sha256) before it is read, members are bounded by their tar headers and
only JSON and PNG members are decoded. Cache files are read with numpy's header parser, which refuses
object arrays: nothing is ever unpickled.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clsp.errors import UserError
from clsp.io import atomic_path, exclusive_lock
from clsp.shards import schema

if TYPE_CHECKING:
    from clsp.train.data import ShardSet

Chooser = Callable[[np.ndarray, np.ndarray, int], np.ndarray]  # (draws [n], scores [n, k], k) -> candidates [n]

CACHE_VERSION = 2
MEMORY_SHARE = 0.5  # of the physical memory, split over the processes of this machine
_UNREAD, _WITH_ANCHOR, _NO_ANCHOR = 0, 1, 2
_FILES = ("positives", "done", "anchors", "state")  # the state file last: present means all are


@dataclass
class _Shard:
    """One shard's decoded rows."""

    positives: np.ndarray  # uint8 [n, k, H, W, 3]
    done: np.ndarray  # uint8 [n, k]: 1 where the candidate is decoded
    anchors: np.ndarray  # uint8 [n, H, W, 3]
    state: np.ndarray  # uint8 [n]
    mapped: bool = False  # file-backed: pixels flushed before the flags that declare them


def _flush(*arrays: np.ndarray) -> None:
    """Write the pages of a file-backed shard's arrays (``np.memmap``) to their files."""
    for array in arrays:
        if not isinstance(array, np.memmap):
            raise TypeError("a file-backed decoded shard holds an array that is not memory-mapped")
        array.flush()


def _geometry(shards: ShardSet) -> dict[int, tuple[int, int]]:
    """shard -> (rows, candidates) for every verified shard of the set."""
    return {s: (len(shards.anchors(s)), shards.store.record(s).candidates) for s in shards.shards}


def _shapes(rows: int, k: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    return {"positives": (rows, k, height, width, 3), "done": (rows, k), "anchors": (rows, height, width, 3),
            "state": (rows,)}


class DecodedShards:
    """The positives (and stored anchors) of a shard set as uint8 arrays, each row decoded on first use.

    Shard ``i`` holds anchors ``[i * shard_size, ...)`` in order, so an anchor's row is arithmetic.
    """

    def __init__(self, shards: ShardSet, cache_dir: str | os.PathLike | None = None, *,
                 memory_limit: int | None = None) -> None:
        self.shards, self.store = shards, shards.store
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        height, width = self.store.manifest.image_shape
        self._pixels = height * width * 3
        self._geometry = _geometry(shards)
        self._shards: dict[int, _Shard] = {}
        self._score_cache: dict[int, np.ndarray] = {}
        self._memory: mmap.mmap | None = None
        self.keeps = True
        if self.cache_dir is None:
            need = self.nbytes
            limit = _memory_budget() if memory_limit is None else memory_limit
            if need > limit:
                self.keeps = False
                warnings.warn(f"the decoded shards would take {need / 2**30:.1f} GiB, over the "
                              f"{limit / 2**30:.1f} GiB this process may use, so each epoch decodes the positives "
                              f"it draws; set a decoded-cache directory to keep them on disk", stacklevel=2)
            else:
                self._map_memory()

    @property
    def nbytes(self) -> int:
        """Bytes of the whole decoded set (positives, anchors, flags)."""
        height, width = self.store.manifest.image_shape
        return sum(math.prod(shape) for rows, k in self._geometry.values()
                   for shape in _shapes(rows, k, height, width).values())

    def _map_memory(self) -> None:
        """Views into one anonymous shared mapping: pages cost memory only once written."""
        self._memory = mmap.mmap(-1, max(1, self.nbytes))
        height, width = self.store.manifest.image_shape
        offset = 0
        for shard, (rows, k) in self._geometry.items():
            views: dict[str, np.ndarray] = {}
            for name, shape in _shapes(rows, k, height, width).items():
                size = math.prod(shape)
                views[name] = np.frombuffer(self._memory, np.uint8, size, offset).reshape(shape)
                offset += size
            self._shards[shard] = _Shard(**views, mapped=False)

    def __getstate__(self) -> dict:
        """Pickled (a spawned worker): a memory cache stays behind, file maps are reopened where unpickled."""
        state = dict(self.__dict__, _memory=None, _shards={})
        if self.cache_dir is None:
            state["keeps"] = False
        return state

    # ---- what the stream and the device-resident set ask for --------------------------------------------
    def drawn(self, anchors: np.ndarray, draws: np.ndarray, choose: Chooser | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One positive per anchor, candidate ``int(draw * k)`` for its draw in [0, 1) (as the stream draws)
        or ``choose(draws, scores [n, k], k)`` (a policy of ``clsp.train.positive_choice`` over the stored
        scores), and the stored anchor images with a mask of the anchors whose shard holds one.

        Returns positives uint8 ``[n, H, W, 3]``, anchors uint8 ``[n, H, W, 3]`` (zero where the mask is
        False) and the mask bool ``[n]``.
        """
        anchors, draws = np.asarray(anchors, dtype=np.int64), np.asarray(draws, dtype=np.float64)
        height, width = self.store.manifest.image_shape
        positives = np.empty((len(anchors), height, width, 3), np.uint8)
        images = np.zeros_like(positives)
        stored = np.zeros(len(anchors), bool)
        for shard, rows, mine in self._by_shard(anchors):
            k = self._geometry[shard][1]
            candidate = (draws[mine] * k).astype(np.int64) if choose is None else \
                np.asarray(choose(draws[mine], self._scores(shard)[rows], k), dtype=np.int64)
            if not self.keeps:
                positives[mine], images[mine], stored[mine] = self._decode(shard, rows, candidate)
                continue
            arrays = self._rows(shard, rows, candidate)
            positives[mine] = arrays.positives[rows, candidate]
            stored[mine] = arrays.state[rows] == _WITH_ANCHOR
            images[mine[stored[mine]]] = arrays.anchors[rows[stored[mine]]]
        return positives, images, stored

    def positives(self, anchors: np.ndarray) -> np.ndarray:
        """All k positives of each anchor: uint8 ``[n, k, H, W, 3]`` (one k across the anchors' shards)."""
        anchors = np.asarray(anchors, dtype=np.int64)
        parts = list(self._by_shard(anchors))
        ks = {self._geometry[shard][1] for shard, _, _ in parts}
        if len(ks) > 1:
            raise UserError(f"the shards of {self.store.path} hold different numbers of candidates ({sorted(ks)})")
        height, width = self.store.manifest.image_shape
        out = np.empty((len(anchors), ks.pop() if ks else 0, height, width, 3), np.uint8)
        for shard, rows, mine in parts:
            out[mine] = self._rows(shard, rows, None).positives[rows] if self.keeps else \
                self._decode(shard, rows, None)[0]
        return out

    def stored_anchors(self, anchors: np.ndarray) -> np.ndarray | None:
        """The real anchors as the shards store them, uint8 ``[n, H, W, 3]``; None unless all are stored."""
        _, images, stored = self.drawn(anchors, np.zeros(len(anchors)))
        return images if stored.all() else None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every anchor index of the set (ascending) and its positives ``[N, k, H, W, 3]``."""
        indices = np.concatenate([np.arange(r.start, r.stop) for r in map(self.shards.anchors, self.shards.shards)])
        return indices, self.positives(indices)

    def _scores(self, shard: int) -> np.ndarray:
        """The candidates' stored scores ``[n, k]`` of one shard (read once: records only, no pixels)."""
        if shard not in self._score_cache:
            path = self.store.shard_path(shard)
            rows = [record.scores for _, record, _ in self.store.read_records(shard)]
            if any(row is None for row in rows):
                raise UserError(f"shard {shard} holds no candidate scores ({path}); regenerate with clsp-gen "
                                "--scores or use --positive-choice uniform")
            self._score_cache[shard] = np.asarray(rows, dtype=np.float64)
        return self._score_cache[shard]

    # ---- decoding ------------------------------------------------------------------------------------------
    def _by_shard(self, anchors: np.ndarray):
        """(shard, rows in the shard, positions in ``anchors``) per shard the anchors fall in."""
        shard, row = np.divmod(anchors, self.shards.shard_size)
        for s in np.unique(shard).tolist():
            if s not in self._geometry:
                raise UserError(f"shard {s} is not among the verified shards of {self.store.path}")
            mine = np.flatnonzero(shard == s)
            yield s, row[mine], mine

    def _rows(self, shard: int, rows: np.ndarray, candidate: np.ndarray | None) -> _Shard:
        """The shard's arrays with ``candidate`` of each of ``rows`` decoded (all k when None); the shard is
        read only when one is missing, and then each of ``rows`` read before gets all its candidates."""
        arrays = self._shards.get(shard) or self._open(shard)
        k = arrays.done.shape[1]
        asked = np.ones((len(rows), k), bool) if candidate is None else np.eye(k, dtype=bool)[candidate]
        done, read_before = arrays.done[rows].astype(bool), arrays.state[rows] != _UNREAD
        if not ((asked & ~done).any() or not read_before.all()):
            return arrays
        # the shard is read: a row read before gets all its candidates, a new row those asked for
        need = (asked | read_before[:, None]) & ~done
        wanted: dict[int, np.ndarray] = {}
        for row, want, new in zip(rows.tolist(), need, ~read_before):
            if want.any() or new:
                wanted[row] = want | wanted.get(row, False)
        first = self.shards.anchors(shard).start
        path, shape = self.store.shard_path(shard), self.store.manifest.image_shape
        decoded = []
        for key, record, members in self.store.read_records(shard):
            row = record.anchor_index - first
            if row not in wanted:
                continue
            read_before = arrays.state[row] != _UNREAD
            todo = np.flatnonzero(wanted[row] & ~arrays.done[row].astype(bool))
            for j in todo.tolist():
                arrays.positives[row, j] = schema.decode_member(key, members, f"pos{j}.png", shape=shape, where=path)
            if not read_before and "anchor.png" in members:
                arrays.anchors[row] = schema.decode_member(key, members, "anchor.png", shape=shape, where=path)
            decoded.append((row, todo, _WITH_ANCHOR if "anchor.png" in members else _NO_ANCHOR))
        if arrays.mapped:  # pixels on disk before the flags that declare them
            _flush(arrays.positives, arrays.anchors)
        for row, todo, state in decoded:
            arrays.done[row, todo] = 1
            arrays.state[row] = state
        if arrays.mapped:
            _flush(arrays.done, arrays.state)
        return arrays

    def _decode(self, shard: int, rows: np.ndarray, candidate: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Without a kept cache: the given candidate of each row (all k when None), anchors and their mask."""
        first = self.shards.anchors(shard).start
        path, shape = self.store.shard_path(shard), self.store.manifest.image_shape
        positions: dict[int, list[int]] = {}
        for i, row in enumerate(rows.tolist()):
            positions.setdefault(row, []).append(i)
        k = self._geometry[shard][1]
        height, width = shape
        positives = np.empty((len(rows), *(() if candidate is not None else (k,)), height, width, 3), np.uint8)
        images = np.zeros((len(rows), height, width, 3), np.uint8)
        stored = np.zeros(len(rows), bool)
        for key, record, members in self.store.read_records(shard):
            for i in positions.get(record.anchor_index - first, ()):
                if candidate is None:
                    positives[i] = [schema.decode_member(key, members, f"pos{j}.png", shape=shape, where=path)
                                    for j in range(record.candidates)]
                else:
                    positives[i] = schema.decode_member(key, members, f"pos{candidate[i]}.png", shape=shape,
                                                        where=path)
                if "anchor.png" in members:
                    images[i] = schema.decode_member(key, members, "anchor.png", shape=shape, where=path)
                    stored[i] = True
        return positives, images, stored

    # ---- files -------------------------------------------------------------------------------------------
    def _open(self, shard: int) -> _Shard:
        """The shard's memory-mapped files under ``cache_dir``, made (all zero) by the first process to need them."""
        if self.cache_dir is None:
            raise AssertionError("a memory cache maps every shard when it is made")
        rows, k = self._geometry[shard]
        height, width = self.store.manifest.image_shape
        digest = self.store.record(shard).sha256[:16]
        stem = self.cache_dir / f"v{CACHE_VERSION}-shard-{shard:06d}-{digest}"
        shapes = _shapes(rows, k, height, width)
        paths = {name: stem.with_name(f"{stem.name}.{name}.npy") for name in _FILES}
        with exclusive_lock(stem.with_name(f"{stem.name}.lock")):
            if not paths["state"].is_file():
                for name in _FILES:
                    with atomic_path(paths[name]) as tmp:
                        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shapes[name]).flush()
        arrays = {}
        for name, shape in shapes.items():
            try:
                arrays[name] = np.lib.format.open_memmap(paths[name], mode="r+")
            except (OSError, ValueError) as err:
                raise UserError(f"unreadable decoded-shard cache file {paths[name]} ({err}); delete it") from None
            if arrays[name].dtype != np.uint8 or arrays[name].shape != shape:
                raise UserError(f"decoded-shard cache file {paths[name]} holds {arrays[name].dtype} "
                                f"{list(arrays[name].shape)}, not uint8 {list(shape)}; delete it")
        self._shards[shard] = _Shard(**arrays, mapped=True)
        return self._shards[shard]


def _memory_budget() -> int:
    """The bytes one process may keep decoded: a share of the physical memory over this machine's processes."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return int(physical * MEMORY_SHARE / max(1, local))
