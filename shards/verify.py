"""Check a shard directory against its manifest: every shard present, intact, and every anchor once."""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import IO

from clsp.errors import ShardError
from clsp.io import file_digest
from clsp.runtime import progress
from clsp.shards import schema
from clsp.shards.reader import Location, ShardDirectory, tar_samples

_LISTED = 8  # unwritten shards listed one per line; more are summarised as ranges


def _add_run(runs: list[list[int]], first: int, last: int) -> None:
    if runs and first == runs[-1][1] + 1:
        runs[-1][1] = last
    else:
        runs.append([first, last])


def _spans(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    runs: list[list[int]] = []
    for v in values:
        _add_run(runs, v, v)
    return _runs_text(runs)


def _runs_text(runs: list[list[int]], limit: int = 8) -> str:
    """The first ``limit`` runs, ``"1-3, 7 ..."``."""
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:limit])
    return text + (" ..." if len(runs) > limit else "")


def _missing(ranges: list[range], seen: dict[int, str]) -> tuple[list[list[int]], int]:
    """Runs of the anchors of ``ranges`` that are not in ``seen``, and how many, found from the anchors read:
    the work is bounded by the shards' contents, not by the counts their records claim."""
    present, count = sorted(seen), 0
    runs: list[list[int]] = []
    for anchors in ranges:
        low, high = bisect_left(present, anchors.start), bisect_left(present, anchors.stop)
        start = anchors.start
        for anchor in present[low:high]:
            if anchor > start:
                _add_run(runs, start, anchor - 1)
            start = anchor + 1
        if start < anchors.stop:
            _add_run(runs, start, anchors.stop - 1)
        count += len(anchors) - (high - low)
    return runs, count


def _record_problem(store: ShardDirectory, index: int, recorded: schema.ShardRecord) -> str | None:
    """Why a ``shard-NNNNNN.json`` record is unusable or disagrees with the manifest, or None."""
    name = schema.record_name(index)
    if not store.store.exists(name):
        return f"{name}: missing (the manifest records its shard)"
    try:
        record = schema.parse_json(schema.ShardRecord, store.store.read_bounded(name, schema.MAX_SHARD_RECORD_BYTES),
                                   limit=schema.MAX_SHARD_RECORD_BYTES, where=name, what="the shard record",
                                   fix="regenerate the shard with clsp-gen")
    except ShardError as err:
        return str(err)
    return None if record == recorded else f"{name}: disagrees with the manifest"


def _has_end_marker(stream: IO[bytes]) -> bool:
    """Whether a tar ends with its two zero blocks; ``tarfile`` reads a tar cut at a header boundary silently."""
    size = stream.seek(0, os.SEEK_END)
    if size < 1024 or size % 512:
        return False
    stream.seek(size - 1024)
    return stream.read() == bytes(1024)


def _check_shard(store: ShardDirectory, index: int, seen: dict[int, str]) -> list[str]:
    """Problems of one recorded shard (read even when altered, to say what is wrong); adds its anchors to ``seen``."""
    record, anchors, name = store.record(index), store.anchor_range(index), schema.shard_name(index)
    if not store.store.exists(name):
        return [f"{name}: missing (the manifest records it)"]
    with store.store.fetched(name) as stream:
        return _problems(store, record, anchors, stream, seen)


def _problems(store: ShardDirectory, record: schema.ShardRecord, anchors: range, stream: IO[bytes],
              seen: dict[int, str]) -> list[str]:
    """The problems ``_check_shard`` lists, of one shard's fetched file."""
    name = schema.shard_name(record.index)
    problems = []
    size, sha256 = file_digest(stream)
    if size != record.bytes:
        problems.append(f"{name}: {size} bytes, the manifest records {record.bytes} (truncated or altered)")
    elif sha256 != record.sha256:
        problems.append(f"{name}: sha256 differs from the manifest (altered)")
    count = 0
    try:
        for key, members, unread in tar_samples(stream, store.manifest.image_shape, store.shard_path(record.index)):
            count += 1
            if unread:
                problems.append(f"{name}: sample {key} has members no reader loads: {', '.join(sorted(unread))}")
            try:
                sample = schema.decode_sample(key, members, shape=store.manifest.image_shape,
                                              candidates=record.candidates, where=name)
            except ShardError as err:
                problems.append(str(err))
                continue
            anchor = sample.anchor_index
            if anchor not in anchors:
                problems.append(f"{name}: anchor {anchor} is outside its range {anchors.start}-{anchors.stop - 1}")
            if anchor in seen:
                problems.append(f"{name}: anchor {anchor} is duplicated (also in {seen[anchor]})")
            seen.setdefault(anchor, name)
    except ShardError as err:
        problems.append(f"{name}: {err}")
    else:
        if not _has_end_marker(stream):
            problems.append(f"{name}: truncated or not a valid tar (no end-of-archive blocks)")
    if count != record.samples:
        problems.append(f"{name}: {count} samples, the manifest records {record.samples}")
    return problems


def verify_shards(directory: Location) -> list[str]:
    """Everything wrong with a shard directory, one line each; empty when all is well.

    A manifest that is itself malformed is a ShardError (nothing else can be checked without it).
    """
    store = ShardDirectory.open(directory)  # a manifest over its budgets (schema.MAX_SHARDS, ...) is refused here
    recorded = store.manifest.shards
    seen: dict[int, str] = {}
    expected: list[range] = []
    problems: list[str] = []
    unwritten = [index for index in range(store.num_shards) if schema.shard_name(index) not in recorded]
    if len(unwritten) > _LISTED:
        problems.append(f"shards not written yet (planned, not in the manifest): {_spans(unwritten)} "
                        f"({len(unwritten)} in all)")
    else:
        problems += [f"{schema.shard_name(i)}: not written yet (planned, not in the manifest)" for i in unwritten]
    for index in progress(store.manifest.recorded, desc="verify", unit="shard"):
        name = schema.shard_name(index)
        expected.append(store.anchor_range(index))
        problems += _check_shard(store, index, seen)
        problem = _record_problem(store, index, recorded[name])
        if problem:
            problems.append(problem)
    missing, count = _missing(expected, seen)
    if count:
        problems.append(f"anchors missing from their shards: {_runs_text(missing)} ({count} in all)")
    problems += [f"{name}: stray shard file, not recorded in the manifest"
                 for name in store.store.names("*.tar") if name not in recorded]
    return problems
