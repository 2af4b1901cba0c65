"""Seeded fuzzing of the shard reader and verifier: whatever the bytes, only the project's errors escape.

Mutated tars, PNG members, sample records and manifests are fed to ``ShardDirectory.samples`` and
``verify_shards``, half of them re-sealed (size and sha256 recorded as if a writer made them) so the
reader gets past its integrity check to the parsing itself.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from clsp.errors import UserError
from clsp.io import file_digest
from clsp.shards import reader, schema, verify, writer

SIZE, K = 8, 2
DATASET = {"name": "digits", "split": "train", "size": 8, "fingerprint": "0123456789abcdef", "image_size": SIZE,
           "num_classes": 10}
ODD_VALUES = [None, [], {}, "x", -1, 0, 2**70, 1e308, float("inf"), float("nan"), True, [1], {"a": 1}, "9" * 5000, 1.5]


def byte_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: flipped bytes, a cut, inserted or repeated bytes."""
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0 and data:
        for _ in range(rng.integers(1, 9)):
            data[rng.integers(len(data))] ^= int(rng.integers(1, 256))
    elif kind == 1:
        data = data[:rng.integers(len(data) + 1)]
    elif kind == 2:
        at = rng.integers(len(data) + 1)
        data[at:at] = rng.integers(0, 256, rng.integers(1, 600), dtype=np.uint8).tobytes()
    else:
        a = rng.integers(len(data) + 1)
        data[a:a] = data[a:a + int(rng.integers(1, 2000))]
    return bytes(data)


def json_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """A field set to an odd value, removed or added; or, one time in four, damaged bytes."""
    if rng.random() < 0.25:
        return byte_mutation(data, rng)
    record = json.loads(data)
    target = record
    if "shards" in record and record["shards"] and rng.random() < 0.5:
        target = next(iter(record["shards"].values()))
    key = list(target)[rng.integers(len(target))]
    action = rng.integers(3)
    if action == 0:
        target[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    elif action == 1:
        del target[key]
    else:
        target[f"extra{rng.integers(3)}"] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
    return json.dumps(record).encode()


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def members_of(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return [(info.name, tar.extractfile(info).read()) for info in tar]


def reseal(directory: Path) -> None:
    path = directory / schema.shard_name(0)
    size, sha256 = file_digest(path)
    manifest = json.loads((directory / reader.MANIFEST).read_text())
    manifest["shards"][path.name].update(bytes=size, sha256=sha256)
    (directory / reader.MANIFEST).write_text(json.dumps(manifest))


def exercise(directory: Path) -> None:
    """Read and verify; anything but the project's own error type fails the test."""
    try:
        list(reader.ShardDirectory.open(directory).samples())
    except UserError as err:
        assert "\n" not in str(err)
    try:
        verify.verify_shards(directory)
    except UserError as err:
        assert "\n" not in str(err)


def test_mutated_shards_records_and_manifests_raise_only_project_errors(tmp_path):
    manifest = writer.init_manifest(tmp_path, dataset=DATASET, generation={"w": 0.1}, num_anchors=8, shard_size=4)
    rng = np.random.default_rng(0)
    for i in range(manifest.num_shards):
        writer.write_shard(tmp_path, i, (schema.ShardSample(a, rng.integers(0, 256, (K, SIZE, SIZE, 3), np.uint8),
                                                            anchor=rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8),
                                                            scores=np.array([0.5, -0.5]))
                                         for a in manifest.anchor_range(i)))
    shard, manifest_path = tmp_path / schema.shard_name(0), tmp_path / reader.MANIFEST
    good_tar, good_manifest = shard.read_bytes(), manifest_path.read_bytes()
    members = members_of(good_tar)
    rng = np.random.default_rng(1234)
    for trial in range(300):
        kind = trial % 4
        if kind == 3:
            manifest_path.write_bytes(json_mutation(good_manifest, rng))
        else:
            if kind == 0:
                data = byte_mutation(good_tar, rng)
            else:
                suffix = ".json" if kind == 1 else ".png"
                chosen = [n for n, (name, _) in enumerate(members) if name.endswith(suffix)]
                n = chosen[rng.integers(len(chosen))]
                mutate = json_mutation if suffix == ".json" else byte_mutation
                data = tar_of([(name, mutate(body, rng) if m == n else body) for m, (name, body) in enumerate(members)])
            shard.write_bytes(data)
            if rng.random() < 0.5:
                reseal(tmp_path)
        try:
            exercise(tmp_path)
        except AssertionError:
            raise
        except Exception as err:  # the point: name the mutation that let another error out
            pytest.fail(f"trial {trial} (kind {kind}) let {type(err).__name__} escape: {err}")
        shard.write_bytes(good_tar)
        manifest_path.write_bytes(good_manifest)
    assert verify.verify_shards(tmp_path) == []  # the restored directory is whole again
