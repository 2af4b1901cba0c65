"""Writing a shard directory so that a crash or a concurrent writer never leaves it inconsistent.

A shard is written under a temporary name, renamed into place only when complete, then recorded:
first in its own ``shard-NNNNNN.json``, then in ``manifest.json``. Manifest updates are
read-modify-rename under an exclusive ``flock``, so any number of processes (ranks of one job, or
Slurm array tasks) can finish shards of one directory at once. A writer killed mid-shard leaves
only a hidden temporary file that nothing registers; the next writer of that shard removes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import webdataset as wds

from clsp.errors import UserError
from clsp.io import atomic_path, write_json_atomic
from clsp.shards import schema
from clsp.shards.reader import MANIFEST, read_manifest

LOCK = ".manifest.lock"
TAR_MTIME = 0  # a fixed member time makes the same samples give byte-identical shards
_SETTINGS = ("dataset", "generation", "num_anchors", "shard_size")


@contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _normalised(value):
    """The value as it reads back from JSON (tuples become lists), so settings compare as stored."""
    return json.loads(json.dumps(value, sort_keys=True))


def _differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for key in _SETTINGS:
        a, b = old.get(key), new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def _remove_shard_files(directory: Path) -> None:
    for path in directory.glob("shard-*.*"):
        path.unlink()
    for path in directory.glob(".shard-*"):
        path.unlink()


def init_manifest(directory: str | os.PathLike, *, dataset: dict, generation: dict, num_anchors: int,
                  shard_size: int, overwrite: bool = False) -> dict:
    """Create ``manifest.json``, or return the existing one when it was made with the same settings.

    Settings are the dataset identity (``ImageDataset.describe()``), the generation settings, the
    anchor count and the shard size. Other settings in an existing manifest are refused unless
    ``overwrite``; then its shards and records are removed and the directory starts over. With the same
    settings the existing manifest is returned (resume), whatever ``overwrite`` says, so concurrent
    workers never wipe each other's shards.
    """
    if num_anchors < 1 or shard_size < 1:
        raise UserError(f"need at least one anchor and a positive shard size, got {num_anchors} and {shard_size}")
    directory = Path(directory)
    fresh = _normalised({"schema_version": schema.SCHEMA_VERSION, "dataset": dataset, "generation": generation,
                         "num_anchors": int(num_anchors), "shard_size": int(shard_size),
                         "num_shards": math.ceil(num_anchors / shard_size), "shards": {}})
    with _manifest_lock(directory):
        if (directory / MANIFEST).exists():
            existing = read_manifest(directory)
            diffs = _differences(existing, fresh)
            if not diffs:
                return existing
            if not overwrite:
                shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
                raise UserError(f"{directory} holds shards made with other settings ({shown}); "
                                f"pass --overwrite to replace them, or write to another directory")
            _remove_shard_files(directory)
        write_json_atomic(directory / MANIFEST, fresh)
    return fresh


def num_shards(manifest: dict) -> int:
    return math.ceil(int(manifest["num_anchors"]) / int(manifest["shard_size"]))


def shard_anchor_range(manifest: dict, shard_index: int) -> range:
    """The anchors shard ``shard_index`` holds: ``[i * shard_size, min((i + 1) * shard_size, num_anchors))``."""
    if not 0 <= shard_index < num_shards(manifest):
        raise ValueError(f"shard index {shard_index} is outside 0..{num_shards(manifest) - 1}")
    size = int(manifest["shard_size"])
    return range(shard_index * size, min((shard_index + 1) * size, int(manifest["num_anchors"])))


def file_digest(path: Path) -> tuple[int, str]:
    """(bytes, sha256 hex) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return path.stat().st_size, digest.hexdigest()


def _checked(samples: Iterable[schema.ShardSample], anchors: range) -> Iterator[schema.ShardSample]:
    """Pass samples through, insisting they are exactly ``anchors`` in order with one positive shape."""
    expected = iter(anchors)
    shape = None
    for sample in samples:
        want = next(expected, None)
        if sample.anchor_index != want:
            raise ValueError(f"expected anchor {want} next, got {sample.anchor_index}: a shard's samples must be "
                             f"anchors {anchors.start}..{anchors.stop - 1} in order")
        shape = shape or np.shape(sample.positives)
        if np.shape(sample.positives) != shape:
            raise ValueError(f"anchor {sample.anchor_index} has positives {list(np.shape(sample.positives))}, "
                             f"the shard's first had {list(shape)}")
        yield sample
    left = next(expected, None)
    if left is not None:
        raise ValueError(f"samples ended before anchor {left}; a shard must hold anchors "
                         f"{anchors.start}..{anchors.stop - 1}")


def _register(directory: Path, name: str, record: dict) -> None:
    """Add a finished shard's record to the manifest: read-modify-rename under the lock."""
    with _manifest_lock(directory):
        for stale in directory.glob(f".{MANIFEST}.*"):  # left by a writer killed mid-update; we hold the lock
            stale.unlink()
        manifest = read_manifest(directory)
        manifest["shards"][name] = record
        write_json_atomic(directory / MANIFEST, manifest)


def write_shard(directory: str | os.PathLike, shard_index: int, samples: Iterable[schema.ShardSample], *,
                rank: int = 0, world_size: int = 1) -> dict:
    """Write shard ``shard_index`` from its samples (its whole anchor range, in order) and record it.

    Returns the shard's record. If the samples raise, or the process dies, nothing is registered and
    a rerun writes the shard afresh.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    anchors = shard_anchor_range(manifest, shard_index)
    name = schema.shard_name(shard_index)
    for stale in directory.glob(f".{Path(name).stem}.*"):  # temporaries of an earlier, killed writer
        stale.unlink(missing_ok=True)
    candidates = 0
    with atomic_path(directory / name) as tmp:
        with open(tmp, "wb") as stream:
            with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as tar:
                for sample in _checked(samples, anchors):
                    candidates = len(sample.positives)
                    tar.write(schema.encode_sample(sample))
            stream.flush()
            os.fsync(stream.fileno())
        size, sha256 = file_digest(tmp)
    record = {"index": shard_index, "samples": len(anchors), "first_anchor": anchors.start,
              "last_anchor": anchors.stop - 1, "candidates": candidates, "bytes": size, "sha256": sha256,
              "rank": rank, "world_size": world_size}
    write_json_atomic(directory / schema.record_name(shard_index), record)
    _register(directory, name, record)
    return record


def completed_shards(directory: str | os.PathLike) -> set[int]:
    """Shards recorded in the manifest whose file is present with the recorded size and sha256."""
    directory = Path(directory)
    done = set()
    for name, record in read_manifest(directory)["shards"].items():
        path = directory / name
        if path.is_file() and path.stat().st_size == record["bytes"] and file_digest(path)[1] == record["sha256"]:
            done.add(int(record["index"]))
    return done
