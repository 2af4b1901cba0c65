"""The shard contract: bit-exact round trips, crash safety, concurrent writers, verify, and no unpickling."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from clsp.errors import ShardError, UserError
from clsp.io import file_digest
from clsp.shards import reader, schema, verify, writer
from support import DATASET, anchor_image, make_shards, positives_of, samples_for, settings


def rewrite_shard(directory: Path, index: int, raw_samples: list[dict]) -> None:
    """Replace a shard's tar with hand-made members and re-record its size and hash (as if written so)."""
    path = directory / schema.shard_name(index)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for raw in raw_samples:
            tar.write(raw)
    size, sha256 = file_digest(path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][path.name].update(bytes=size, sha256=sha256)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / schema.record_name(index)).write_text(json.dumps(manifest["shards"][path.name]))


def test_round_trip_is_bit_exact(tmp_path):
    manifest = make_shards(tmp_path)
    assert manifest.num_shards == 3 and sorted(manifest.shards) == [schema.shard_name(i) for i in range(3)]
    assert [manifest.shards[schema.shard_name(i)].samples for i in range(3)] == [10, 10, 3]
    samples = list(reader.ShardDirectory.open(tmp_path).samples())
    assert [s.anchor_index for s in samples] == list(range(23))
    for s in samples:
        a = s.anchor_index
        assert s.positives.dtype == np.uint8 and np.array_equal(s.positives, positives_of(a))
        assert np.array_equal(s.anchor, anchor_image(a))
        assert (s.label, s.seed, s.scores) == (a % 10, 1000 + a, None)
    assert writer.completed_shards(tmp_path) == {0, 1, 2}
    assert verify.verify_shards(tmp_path) == []


def test_same_samples_give_byte_identical_shards(tmp_path):
    make_shards(tmp_path / "a")
    time.sleep(1.1)  # a member time taken from the clock would now differ
    make_shards(tmp_path / "b")
    for i in range(3):
        name = schema.shard_name(i)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_writer_rejects_samples_outside_the_shard_range(tmp_path):
    manifest = writer.init_manifest(tmp_path, **settings())
    wrong = [schema.ShardSample(a, positives_of(a)) for a in range(1, 11)]
    with pytest.raises(ValueError, match="expected anchor 0 next"):
        writer.write_shard(tmp_path, 0, wrong)
    short = [schema.ShardSample(a, positives_of(a)) for a in range(5)]
    with pytest.raises(ValueError, match="ended before anchor 5"):
        writer.write_shard(tmp_path, 0, short)
    assert reader.read_manifest(tmp_path).shards == {} and not list(tmp_path.glob("*shard-*"))
    assert manifest.num_shards == 3


def test_interrupted_writer_registers_nothing_and_rerun_completes(tmp_path):
    manifest = writer.init_manifest(tmp_path, **settings())

    def dies_midway():
        for n, sample in enumerate(samples_for(manifest, 1)):
            if n == 4:
                raise RuntimeError("generator crashed")
            yield sample

    with pytest.raises(RuntimeError, match="generator crashed"):
        writer.write_shard(tmp_path, 1, dies_midway())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.lock", "manifest.json"]
    assert reader.read_manifest(tmp_path).shards == {} and writer.completed_shards(tmp_path) == set()
    writer.write_shard(tmp_path, 1, samples_for(manifest, 1))
    assert writer.completed_shards(tmp_path) == {1}
    assert [s.anchor_index for s in reader.ShardDirectory.open(tmp_path).samples()] == list(range(10, 20))


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    from clsp.shards import schema, writer

    directory, marker = Path(sys.argv[1]), Path(sys.argv[2])

    def samples():
        for a in range(8):
            if a == 5:
                marker.touch()
                time.sleep(120)
            yield schema.ShardSample(a, np.full((2, 8, 8, 3), a, np.uint8))

    writer.write_shard(directory, 0, samples())
""")


def test_writer_killed_with_sigkill_leaves_nothing_registered(tmp_path, cli_env):
    directory, marker = tmp_path / "shards", tmp_path / "writing"
    manifest = writer.init_manifest(directory, **settings(num_anchors=8, shard_size=8))
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(directory), str(marker)], env=cli_env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"writer did not get mid-shard: {child.stderr.read() if child.poll() is not None else ''}"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()
    leftovers = [p.name for p in directory.iterdir()]
    assert any(name.startswith(".shard-000000.tar.") for name in leftovers)  # the killed writer's temp file
    assert not (directory / "shard-000000.tar").exists() and not (directory / "shard-000000.json").exists()
    assert reader.read_manifest(directory).shards == {} and writer.completed_shards(directory) == set()
    assert verify.verify_shards(directory) == ["shard-000000.tar: not written yet (planned, not in the manifest)"]

    writer.write_shard(directory, 0, (schema.ShardSample(a, np.full((2, 8, 8, 3), a, np.uint8))
                                      for a in manifest.anchor_range(0)))
    assert not any(p.name.startswith(".shard-") for p in directory.iterdir())  # stale temp removed
    assert writer.completed_shards(directory) == {0} and verify.verify_shards(directory) == []


def _write_as_worker(directory: str, rank: int, world_size: int) -> None:
    manifest = writer.init_manifest(directory, **settings(num_anchors=24, shard_size=2))
    for i in range(rank, manifest.num_shards, world_size):
        writer.write_shard(directory, i, samples_for(manifest, i), rank=rank, world_size=world_size)


def test_concurrent_writers_all_recorded(tmp_path):
    world_size = 4
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_write_as_worker, args=(str(tmp_path), r, world_size))
               for r in range(world_size)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * world_size
    manifest = reader.read_manifest(tmp_path)
    assert len(manifest.shards) == 12 == manifest.num_shards
    assert all(r.rank == r.index % world_size and r.world_size == world_size for r in manifest.shards.values())
    assert verify.verify_shards(tmp_path) == []
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_init_manifest_resumes_same_settings_and_refuses_others(tmp_path):
    make_shards(tmp_path)
    resumed = writer.init_manifest(tmp_path, **settings())
    assert len(resumed.shards) == 3
    assert len(writer.init_manifest(tmp_path, **settings(), overwrite=True).shards) == 3  # same settings: kept
    with pytest.raises(UserError, match=r"other settings \(generation.w: 0.1 -> 0.5\)"):
        writer.init_manifest(tmp_path, **settings(w=0.5))
    other = dict(settings(), dataset={**DATASET, "fingerprint": "ffffffffffffffff"})
    with pytest.raises(UserError, match="dataset.fingerprint"):
        writer.init_manifest(tmp_path, **other)
    fresh = writer.init_manifest(tmp_path, **settings(w=0.5), overwrite=True)
    assert fresh.shards == {} and fresh.generation["w"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == [".manifest.lock", "manifest.json"]


def test_verify_finds_a_flipped_byte(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / "shard-000001.tar"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify.verify_shards(tmp_path)
    assert "shard-000001.tar: sha256 differs from the manifest (altered)" in problems
    assert not any("shard-000000" in p or "shard-000002" in p for p in problems)  # only the altered shard
    assert writer.completed_shards(tmp_path) == {0, 2}


def test_verify_finds_a_truncated_tar(tmp_path):
    make_shards(tmp_path)
    path = tmp_path / "shard-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 7])
    problems = verify.verify_shards(tmp_path)
    assert any(p.startswith("shard-000000.tar:") and "bytes, the manifest records" in p for p in problems)
    assert any(p.startswith("shard-000000.tar: truncated or not a valid tar") for p in problems)
    assert any(p.startswith("anchors missing from their shards:") for p in problems)


def test_verify_finds_a_missing_shard_and_a_stray_one(tmp_path):
    make_shards(tmp_path)
    (tmp_path / "shard-000002.tar").rename(tmp_path / "shard-000007.tar")
    assert verify.verify_shards(tmp_path) == [
        "shard-000002.tar: missing (the manifest records it)",
        "anchors missing from their shards: 20-22 (3 in all)",
        "shard-000007.tar: stray shard file, not recorded in the manifest",
    ]


def test_verify_finds_duplicated_anchors(tmp_path):
    manifest = make_shards(tmp_path)
    raws = [schema.encode_sample(s) for s in samples_for(manifest, 1)]
    stolen = schema.encode_sample(next(samples_for(manifest, 0)))  # anchor 0 belongs to shard 0
    rewrite_shard(tmp_path, 1, [*raws, raws[2], stolen])
    problems = verify.verify_shards(tmp_path)
    assert "shard-000001.tar: anchor 12 is duplicated (also in shard-000001.tar)" in problems
    assert "shard-000001.tar: anchor 0 is duplicated (also in shard-000000.tar)" in problems
    assert "shard-000001.tar: anchor 0 is outside its range 10-19" in problems
    assert "shard-000001.tar: 12 samples, the manifest records 10" in problems


class _CreatesFile:
    """Unpickling this runs ``open(path, "w")``: proof that a loader executed pickle code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_members_are_never_unpickled(tmp_path):
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_CreatesFile(proof))).close()
    assert proof.exists()  # the payload is live: loading it does create a file

    directory, pwned = tmp_path / "shards", tmp_path / "pwned"
    manifest = make_shards(directory)
    payload = pickle.dumps(_CreatesFile(pwned))
    raws = [{**schema.encode_sample(s), "pyd": payload, "pickle": payload} for s in samples_for(manifest, 0)]
    rewrite_shard(directory, 0, raws)

    samples = list(reader.ShardDirectory.open(directory).samples())
    assert [s.anchor_index for s in samples] == list(range(23))
    assert not pwned.exists()
    problems = verify.verify_shards(directory)
    assert "shard-000000.tar: sample 000000000 has members no reader loads: pickle, pyd" in problems
    assert not pwned.exists()


def test_missing_or_newer_manifest_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no manifest.json in .*run clsp-gen first"):
        reader.read_manifest(tmp_path)
    with pytest.raises(UserError, match="no manifest.json"):
        writer.write_shard(tmp_path, 0, [])
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": schema.SCHEMA_VERSION + 1}))
    with pytest.raises(ShardError,
                       match=r"schema version 2, newer than this clsp understands \(1\) \(.*\): upgrade clsp"):
        reader.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="shard manifest is malformed"):
        verify.verify_shards(tmp_path)
