"""Several processes in one directory: shard writers, results writers, locks and stale temporaries."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clsp.datasets import get_dataset
from clsp.errors import LockError
from clsp.evaluate.cli import knn_eval
from clsp.evaluate.config import KnnJob
from clsp.evaluate.report import RESULTS_FILE, RESULTS_LOCK, record_result
from clsp.io import atomic_path, remove_stale_temporaries
from clsp.shards import reader, schema, verify, writer
from support import make_encoder

SIZE = 8
DATASET = {"name": "digits", "split": "train", "size": 64, "fingerprint": "0123456789abcdef", "image_size": SIZE,
           "num_classes": 10}
SETTINGS = {"dataset": DATASET, "generation": {"w": 0.1}, "num_anchors": 24, "shard_size": 4}
FORK = multiprocessing.get_context("fork")


def _slow_samples(anchors: range):
    for a in anchors:
        time.sleep(0.01)  # long enough that the two writers' shards overlap in time
        yield schema.ShardSample(a, np.full((2, SIZE, SIZE, 3), a, np.uint8))


def _write_every_shard(directory: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait(30)
    manifest = writer.init_manifest(directory, **SETTINGS)
    for i in range(manifest.num_shards):
        writer.write_shard(directory, i, _slow_samples(manifest.anchor_range(i)))


@pytest.mark.slow
def test_two_writer_processes_into_one_directory_never_break_each_other(tmp_path):
    start = FORK.Event()
    workers = [FORK.Process(target=_write_every_shard, args=(str(tmp_path), start)) for _ in range(2)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]  # neither lost its temporary to the other
    assert len(reader.read_manifest(tmp_path).shards) == 6 and verify.verify_shards(tmp_path) == []
    assert not list(tmp_path.glob(".*.tmp-*"))


def _record(run_dir: str, writer_id: int, start: multiprocessing.synchronize.Event) -> None:
    start.wait(30)
    for entry in range(5):
        record_result(run_dir, f"command{writer_id}", f"dataset{entry}", {"writer": writer_id, "entry": entry})


@pytest.mark.slow
def test_concurrent_record_result_never_loses_an_entry(tmp_path):
    for trial in range(10):
        run_dir = tmp_path / f"trial{trial}"
        start = FORK.Event()
        workers = [FORK.Process(target=_record, args=(str(run_dir), w, start)) for w in range(4)]
        for w in workers:
            w.start()
        start.set()
        for w in workers:
            w.join(timeout=60)
        assert [w.exitcode for w in workers] == [0] * 4
        results = json.loads((run_dir / RESULTS_FILE).read_text())
        assert {c: sorted(d) for c, d in results.items()} == {f"command{w}": [f"dataset{e}" for e in range(5)]
                                                              for w in range(4)}, f"trial {trial}"


def labelled_folder(root: Path, offset: int) -> Path:
    """A tiny imagefolder dataset (train/ and test/, two classes) cut from digits at ``offset``."""
    digits = get_dataset("digits")
    labels = digits.labels()
    for split, count in (("train", 6), ("test", 3)):
        for label in (0, 1):
            chosen = np.flatnonzero(labels == label)[offset:offset + count]
            (root / split / str(label)).mkdir(parents=True)
            for index in chosen:
                Image.fromarray(digits.array([int(index)])[0]).save(root / split / str(label) / f"{index}.png")
    return root


def _knn(job: KnnJob, start: multiprocessing.synchronize.Event) -> None:
    start.wait(30)
    knn_eval(job)


@pytest.mark.slow
def test_four_concurrent_knn_evaluations_into_one_run_directory_never_lose_an_entry(tmp_path):
    encoder = make_encoder(tmp_path / "encoder")
    datasets = [f"imagefolder:{labelled_folder(tmp_path / f'data{i}', 10 * i)}" for i in range(4)]
    for trial in range(10):
        out = tmp_path / f"trial{trial}"
        start = FORK.Event()
        workers = [FORK.Process(target=_knn, args=(KnnJob(encoder=str(encoder), dataset=name, out=str(out),
                                                          cache_dir=str(tmp_path / "cache"), k=(3,)), start))
                   for name in datasets]
        for w in workers:
            w.start()
        start.set()
        for w in workers:
            w.join(timeout=300)
        assert [w.exitcode for w in workers] == [0] * 4, f"trial {trial}"
        results = json.loads((out / RESULTS_FILE).read_text())
        assert sorted(results["knn"]) == sorted(datasets), f"trial {trial}"
        report = (out / "report.md").read_text()
        assert all(report.count(f"## kNN: {name}") == 1 for name in datasets), f"trial {trial}: {report}"
        assert not list(out.rglob(".*.tmp-*"))


def test_symlinked_locks_are_refused_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("do not touch")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / writer.LOCK).symlink_to(outside)
    with pytest.raises(LockError, match=rf"lock file is a symbolic link \({shards / writer.LOCK}\): remove it"):
        writer.init_manifest(shards, **SETTINGS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RESULTS_LOCK).symlink_to(outside)
    with pytest.raises(LockError, match="symbolic link"):
        record_result(run_dir, "knn", "digits", {"top1": 1.0})
    assert outside.read_text() == "do not touch" and not (shards / reader.MANIFEST).exists()
    assert not (run_dir / RESULTS_FILE).exists()


HOLDS_A_TEMPORARY = """
import sys, time
from clsp.io import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"partial")
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, cli_env):
    target = tmp_path / "shard-000000.tar"
    child = subprocess.Popen([sys.executable, "-c", HOLDS_A_TEMPORARY, str(target)], env=cli_env,
                             stdout=subprocess.PIPE, text=True)
    dead = Path(child.stdout.readline().strip())
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    other_host = tmp_path / ".shard-000000.tar.abcd.tmp-1@another-host"
    other_host.write_bytes(b"")
    with atomic_path(tmp_path / "shard-000001.tar") as live:
        live.write_bytes(b"mine")
        assert dead.exists() and dead.name.startswith(".shard-000000.tar.")
        assert remove_stale_temporaries(tmp_path, "shard-*") == [dead]
        assert not dead.exists() and live.exists() and other_host.exists()
    assert (tmp_path / "shard-000001.tar").read_bytes() == b"mine"  # the live writer finished normally
    assert remove_stale_temporaries(tmp_path, "shard-*") == []
