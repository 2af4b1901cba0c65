"""Check a shard directory against its manifest: every shard present, intact, and every anchor once."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from clsp.runtime import progress
from clsp.shards import schema
from clsp.shards.reader import raw_samples, read_manifest
from clsp.shards.writer import file_digest, num_shards, shard_anchor_range


def _spans(values: list[int], limit: int = 8) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (the first ``limit`` runs)."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:limit])
    return text + (" ..." if len(runs) > limit else "")


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _has_end_marker(path: Path) -> bool:
    """Whether a tar ends with its two zero blocks; ``tarfile`` reads a tar cut at a header boundary silently."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return f.read() == bytes(1024)


def _check_shard(path: Path, record: dict, anchors: range, seen: dict[int, str], shapes: set) -> list[str]:
    """Problems of one recorded shard; adds its anchors to ``seen`` and positive shapes to ``shapes``."""
    name = path.name
    if not path.is_file():
        return [f"{name}: missing (the manifest records it)"]
    problems = []
    size, sha256 = file_digest(path)
    if size != record["bytes"]:
        problems.append(f"{name}: {size} bytes, the manifest records {record['bytes']} (truncated or altered)")
    elif sha256 != record["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest (altered)")
    count = 0
    try:
        for raw in raw_samples([str(path)], select_files=None):
            count += 1
            ignored = sorted(k for k in raw if not k.startswith("__") and not schema.is_readable_member(f".{k}"))
            if ignored:
                problems.append(f"{name}: sample {raw['__key__']} has members no reader loads: {', '.join(ignored)}")
            try:
                sample = schema.decode_sample(raw)
            except ValueError as err:
                problems.append(f"{name}: {err}")
                continue
            anchor = sample["anchor_index"]
            if anchor not in anchors:
                problems.append(f"{name}: anchor {anchor} is outside its range {anchors.start}-{anchors.stop - 1}")
            if anchor in seen:
                problems.append(f"{name}: anchor {anchor} is duplicated (also in {seen[anchor]})")
            seen.setdefault(anchor, name)
            shapes.add(sample["positives"].shape)
    except (tarfile.TarError, ValueError, OSError) as err:
        problems.append(f"{name}: truncated or not a valid tar ({str(err).split(' @ ')[0]})")
    else:
        if not _has_end_marker(path):
            problems.append(f"{name}: truncated or not a valid tar (no end-of-archive blocks)")
    if count != record["samples"]:
        problems.append(f"{name}: {count} samples, the manifest records {record['samples']}")
    return problems


def verify_shards(directory: str | os.PathLike) -> list[str]:
    """Everything wrong with a shard directory, one line each; empty when all is well."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    recorded = manifest["shards"]
    planned = {schema.shard_name(i): i for i in range(num_shards(manifest))}
    problems = [f"{name}: recorded in the manifest but not one of its {len(planned)} planned shards"
                for name in sorted(set(recorded) - set(planned))]
    seen: dict[int, str] = {}
    shapes: set = set()
    expected: list[int] = []
    for name, index in progress(planned.items(), total=len(planned), desc="verify", unit="shard"):
        if name not in recorded:
            problems.append(f"{name}: not written yet (planned, not in the manifest)")
            continue
        anchors = shard_anchor_range(manifest, index)
        expected += anchors
        problems += _check_shard(directory / name, recorded[name], anchors, seen, shapes)
        record_path = directory / schema.record_name(index)
        if _read_record(record_path) != recorded[name]:
            problems.append(f"{record_path.name}: missing or disagrees with the manifest")
    missing = [a for a in expected if a not in seen]
    if missing:
        problems.append(f"anchors missing from their shards: {_spans(missing)} ({len(missing)} in all)")
    if len(shapes) > 1:
        problems.append(f"positives differ in shape across samples: {sorted(shapes)}")
    problems += [f"{path.name}: stray shard file, not recorded in the manifest"
                 for path in sorted(directory.glob("*.tar")) if path.name not in recorded]
    return problems
