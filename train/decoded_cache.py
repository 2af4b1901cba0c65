"""Each shard decoded once into uint8 arrays, so later epochs index arrays instead of decoding PNGs.

Decoding the k PNG positives of an anchor costs far more than everything else the data path does
per anchor, and the stream decodes all k to use one. ``DecodedShards`` decodes a shard the first time
one of its anchors is asked for and keeps ``positives`` uint8 ``[n, k, H, W, 3]`` (and the stored real
anchors, when the shard has them). With ``cache_dir`` the arrays are also written as ``.npy`` files
and opened as memory maps, by this run's later epochs and by later runs: a file's name holds the
shard's sha256 from the manifest, so a regenerated shard never reuses a stale cache. Files appear
atomically, so ranks sharing a cache directory may write the same shard at once.

A shard file is read in one call and only its ``.json`` and ``.png`` members are decoded, through
``schema.decode_sample`` (nothing is unpickled).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from clsp.errors import UserError
from clsp.io import atomic_path
from clsp.shards import schema
from clsp.train.data import ShardSet

CACHE_VERSION = 1


def read_shard(path: str | Path) -> list[dict]:
    """The raw samples of one tar shard (member suffix -> bytes, plus ``__key__``), in tar order.

    The whole file is read with one call; members other than ``.json`` / ``.png`` / ``.cls`` are skipped.
    """
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(Path(path).read_bytes()), mode="r:") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not schema.is_readable_member(name) or "." not in name:
                continue
            key, suffix = name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
    return list(samples.values())


def decode_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Anchor indices int64 ``[n]``, positives uint8 ``[n, k, H, W, 3]`` and stored anchors (or None)."""
    try:
        decoded = [schema.decode_sample(raw) for raw in read_shard(path)]
    except (ValueError, tarfile.TarError, OSError) as err:
        raise UserError(f"missing or damaged shard {path} ({err}); run `clsp shards verify {Path(path).parent}` "
                        f"and regenerate what it lists") from None
    if not decoded:
        raise UserError(f"shard {path} holds no samples; run `clsp shards verify {Path(path).parent}`")
    indices = np.array([d["anchor_index"] for d in decoded], dtype=np.int64)
    positives = np.stack([d["positives"] for d in decoded])
    stored = [d["anchor"] for d in decoded]
    anchors = np.stack(stored) if all(a is not None for a in stored) else None
    return indices, positives, anchors


class DecodedShards:
    """The positives (and stored anchors) of a shard set as uint8 arrays, one shard decoded at a time.

    Shard ``i`` holds anchors ``[i * shard_size, ...)`` in order, so an anchor's row is arithmetic.
    """

    def __init__(self, shards: ShardSet, cache_dir: str | Path | None = None) -> None:
        self.shards = shards
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._positives: dict[int, np.ndarray] = {}
        self._anchors: dict[int, np.ndarray | None] = {}

    @classmethod
    def load(cls, shards: ShardSet, cache_dir: str | Path | None = None, *, eager: bool = False) -> DecodedShards:
        """Decoded shards of ``shards``, cached under ``cache_dir`` when given; ``eager`` decodes all now."""
        decoded = cls(shards, cache_dir)
        if eager:
            for shard in shards.shards:
                decoded._shard(shard)
        return decoded

    def positives(self, anchors: np.ndarray) -> np.ndarray:
        """All k positives of each anchor: uint8 ``[n, k, H, W, 3]``."""
        return self._gather(anchors, lambda shard, rows, mine: self._shard(shard)[0][rows])

    def drawn(self, anchors: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """One positive per anchor, candidate ``int(draw * k)`` for draws in [0, 1) (as the stream draws)."""
        draws = np.asarray(draws)

        def pick(shard: int, rows: np.ndarray, mine: np.ndarray) -> np.ndarray:
            positives = self._shard(shard)[0]
            return positives[rows, (draws[mine] * positives.shape[1]).astype(np.int64)]

        return self._gather(anchors, pick)

    def stored_anchors(self, anchors: np.ndarray) -> np.ndarray | None:
        """The real anchors as the shards store them, uint8 ``[n, H, W, 3]``; None unless every shard has them."""
        anchors = np.asarray(anchors, dtype=np.int64)
        if any(self._shard(int(s))[1] is None for s in np.unique(anchors // self.shards.shard_size)):
            return None
        return self._gather(anchors, lambda shard, rows, mine: self._shard(shard)[1][rows])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Every anchor index of the set (ascending) and its positives ``[N, k, H, W, 3]``, in memory."""
        indices = np.concatenate([np.arange(r.start, r.stop) for r in map(self.shards.anchors, self.shards.shards)])
        return indices, self.positives(indices)

    def _gather(self, anchors: np.ndarray, pick) -> np.ndarray:
        """Rows for ``anchors`` in their order; ``pick(shard, rows in shard, positions in anchors)`` selects."""
        anchors = np.asarray(anchors, dtype=np.int64)
        shard, row = np.divmod(anchors, self.shards.shard_size)
        out: np.ndarray | None = None
        for s in np.unique(shard):
            mine = np.flatnonzero(shard == s)
            part = pick(int(s), row[mine], mine)
            if out is None:
                out = np.empty((len(anchors), *part.shape[1:]), dtype=np.uint8)
            out[mine] = part
        return out

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray | None]:
        if shard not in self._positives:
            if shard not in self.shards.shards:
                raise UserError(f"shard {shard} is not among the verified shards of {self.shards.directory}")
            self._positives[shard], self._anchors[shard] = self._load(shard)
        return self._positives[shard], self._anchors[shard]

    def _load(self, shard: int) -> tuple[np.ndarray, np.ndarray | None]:
        paths = self._cache_paths(shard)
        if paths and paths[0].is_file():
            anchors = np.load(paths[1], mmap_mode="r") if paths[1].is_file() else None
            return np.load(paths[0], mmap_mode="r"), anchors
        indices, positives, anchors = decode_shard(self.shards.directory / schema.shard_name(shard))
        expected = self.shards.anchors(shard)
        if not np.array_equal(indices, np.arange(expected.start, expected.stop)):
            raise UserError(f"shard {shard} of {self.shards.directory} does not hold anchors "
                            f"{expected.start}..{expected.stop - 1} in order; run `clsp shards verify`")
        if not paths:
            return positives, anchors
        if anchors is not None:  # before the positives: a present positives file means the shard is complete
            _save(paths[1], anchors)
        _save(paths[0], positives)
        return self._load(shard)

    def _cache_paths(self, shard: int) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        digest = self.shards.manifest["shards"][schema.shard_name(shard)]["sha256"][:16]
        stem = f"v{CACHE_VERSION}-shard-{shard:06d}-{digest}"
        return self.cache_dir / f"{stem}.positives.npy", self.cache_dir / f"{stem}.anchors.npy"


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)
