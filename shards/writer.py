"""Writing a shard directory so that a crash or a concurrent writer never leaves it inconsistent.

A shard is written whole under its final name (see ``store``: a rename locally, one upload to an object
store), then recorded in its own ``shard-NNNNNN.json``. In a local directory it is then also added to
``manifest.json``: read-modify-rename under an exclusive ``flock``, so any number of processes (ranks of one
job, or Slurm array tasks) can finish shards of one directory at once. On an object store, which has no
lock, the record object is the registration: readers merge the records into the manifest, so writers
never update a shared object. A writer killed mid-shard leaves at most a temporary file, named after its
process, that nothing registers; a local one is removed once that process is dead
(``clsp.io.remove_stale_temporaries``), never while its writer is alive.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from pydantic import ValidationError

from clsp.errors import UserError
from clsp.io import file_digest, json_bytes, remove_empty_directories
from clsp.shards import schema
from clsp.shards.reader import MANIFEST, Location, ShardDirectory, read_manifest, read_manifest_file
from clsp.shards.store import ShardStore

LOCK = ".manifest.lock"
TAR_MTIME = 0  # a fixed member time makes the same samples give byte-identical shards
_SETTINGS = ("dataset", "generation", "num_anchors", "shard_size")


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


def _remove_shard_files(store: ShardStore) -> None:
    store.remove(store.names("shard-*.*"))
    store.remove_stale("shard-*")


def _settings(*, dataset: dict, generation: dict, num_anchors: int, shard_size: int) -> schema.Manifest:
    """A fresh manifest of these settings; UserError naming the problem when they are not valid."""
    try:
        return schema.new_manifest(dataset=json.loads(json.dumps(dataset)),
                                   generation=json.loads(json.dumps(generation)), num_anchors=int(num_anchors),
                                   shard_size=int(shard_size))
    except ValidationError as err:
        raise UserError(f"cannot start a shard directory with these settings: {schema.validation_summary(err)}; "
                        f"pass at least one anchor, a positive shard size and the dataset's description") from None


def init_manifest(directory: Location, *, dataset: dict, generation: dict, num_anchors: int,
                  shard_size: int, overwrite: bool = False) -> schema.Manifest:
    """Create ``manifest.json``, or return the existing one when it was made with the same settings.

    Settings are the dataset identity (``ImageDataset.describe()``), the generation settings, the
    anchor count and the shard size. Other settings in an existing manifest are refused unless
    ``overwrite``; then its shards and records are removed and the directory starts over. With the same
    settings the existing manifest is returned (resume), whatever ``overwrite`` says, so concurrent
    workers never wipe each other's shards. Temporaries of dead writers are removed first.
    """
    store = ShardStore.open(directory)
    store.require_writable()
    fresh = _settings(dataset=dataset, generation=generation, num_anchors=num_anchors, shard_size=shard_size)
    with store.lock(LOCK):
        store.remove_stale()
        if store.exists(MANIFEST):
            existing = read_manifest(store)
            diffs = _differences(existing.model_dump(mode="json"), fresh.model_dump(mode="json"))
            if not diffs:
                return existing
            if not overwrite:
                shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
                raise UserError(f"{store.location} holds shards made with other settings ({shown}); "
                                f"replace them (clsp-gen --overwrite) or write to another location")
            _remove_shard_files(store)
        store.write_bytes(MANIFEST, json_bytes(fresh.model_dump(mode="json")))
    return fresh


def discard_unstarted(directory: Location, *, made: list[Path], also: tuple[str, ...] = ()) -> None:
    """Undo ``init_manifest`` after a run is refused before its first shard (a model whose samples are not finite):
    remove the manifest and the files named in ``also``, and the local directories the run ``made`` (deepest first)
    once empty, so nothing half-made stays behind. A directory holding any shard or shard record is left as is."""
    store = ShardStore.open(directory)
    if store.names("shard-*"):
        return
    store.remove([name for name in (MANIFEST, *also) if store.exists(name)])
    if made:
        (made[0] / LOCK).unlink(missing_ok=True)
    remove_empty_directories(made)


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


def _register(store: ShardStore, name: str, record: schema.ShardRecord) -> None:
    """Add a finished shard's record to a local manifest: read-modify-rename under the lock."""
    with store.lock(LOCK):
        store.remove_stale(MANIFEST)  # left by a writer killed mid-update
        manifest = read_manifest(store).model_dump(mode="json")
        manifest["shards"][name] = record.model_dump(mode="json")
        store.write_bytes(MANIFEST, json_bytes(schema.Manifest.model_validate(manifest).model_dump(mode="json")))


def write_shard(directory: Location, shard_index: int, samples: Iterable[schema.ShardSample], *,
                rank: int = 0, world_size: int = 1) -> schema.ShardRecord:
    """Write shard ``shard_index`` from its samples (its whole anchor range, in order) and record it.

    Returns the shard's record. If the samples raise, or the process dies, nothing is registered and
    a rerun writes the shard afresh. Positives must have the manifest's image size.
    """
    store = ShardStore.open(directory)
    manifest = read_manifest_file(store)  # the settings and geometry: the records are not needed here
    anchors = manifest.anchor_range(shard_index)
    name = schema.shard_name(shard_index)
    store.remove_stale(name)  # of an earlier, killed writer; a live one's are kept
    candidates = 0
    with store.writing(name) as stream:
        with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as tar:
            for sample in _checked(samples, anchors):
                _check_shape(sample, manifest.image_shape)
                candidates = len(sample.positives)
                tar.write(schema.encode_sample(sample))
        stream.flush()
        size, sha256 = file_digest(stream)
    record = schema.ShardRecord(index=shard_index, samples=len(anchors), first_anchor=anchors.start,
                                last_anchor=anchors.stop - 1, candidates=candidates, bytes=size, sha256=sha256,
                                rank=rank, world_size=world_size)
    store.write_bytes(schema.record_name(shard_index), json_bytes(record.model_dump(mode="json")))
    if store.local:
        _register(store, name, record)
    return record


def _check_shape(sample: schema.ShardSample, shape: tuple[int, int]) -> None:
    """Refuse positives or an anchor of another size than the manifest's: a reader would refuse the shard."""
    sizes = {tuple(np.shape(sample.positives)[1:3])}
    if sample.anchor is not None:
        sizes.add(tuple(np.shape(sample.anchor)[:2]))
    if sizes != {shape}:
        raise ValueError(f"anchor {sample.anchor_index} has images of {sorted(sizes)}, the manifest's image size "
                         f"is {list(shape)}")


def completed_shards(directory: Location) -> set[int]:
    """Shards recorded in the manifest whose file is present with the recorded size and sha256."""
    return ShardDirectory.open(directory).verified_shards()
