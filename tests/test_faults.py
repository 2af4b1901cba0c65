"""Faults through the real commands in real processes: kill -9 during generation, training and ``clsp run``
(each rerun completes what an uninterrupted run would have written), and concurrent commands in one
directory (nothing lost, nothing corrupt); concurrent evaluations into one run directory are in
test_concurrency.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clsp.evaluate.report import RESULTS_FILE
from clsp.io import load_torch
from clsp.pipeline import STATE_FILE, Pipeline, load_config
from clsp.shards import reader, schema, verify, writer
from support import JOB, NUM_SHARDS, clsp_run, clsp_train, reduced_config, run_gen, shard_bytes, tiny

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def temporaries(directory: Path) -> list[str]:
    """Files an atomic write left behind (``.<name>.<random>.tmp-<pid>@<host>``)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*.tmp-*"))


def kill_when(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
    """SIGKILL ``process`` as soon as ``predicate()`` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the process ended (status {process.returncode}) before the kill point"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def finished_shards(directory: Path) -> int:
    try:
        return len(json.loads((directory / reader.MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


# ---- generation --------------------------------------------------------------------------------------------

def gen_process(shards: Path, model: Path, env: dict) -> subprocess.Popen:
    """The installed clsp-gen console script in a fresh process."""
    return subprocess.Popen([str(BIN / "clsp-gen"), *JOB, "--shards", str(shards), "--unet", str(model),
                             "--no-preview"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_killed_generation_then_rerun_ends_identical_to_an_uninterrupted_run(reference, model_dir, one_thread,
                                                                            tmp_path, cli_env):
    shards = tmp_path / "shards"
    kill_when(lambda: finished_shards(shards) >= 1, gen_process(shards, model_dir, cli_env))
    done = writer.completed_shards(shards)
    assert 1 <= len(done) < NUM_SHARDS
    # also damage a finished shard: the rerun must find it fails its checksum and write it again
    damaged = shards / schema.shard_name(min(done))
    damaged.write_bytes(damaged.read_bytes()[:1000])
    result = run_gen(shards, model_dir, "--no-preview")
    assert result.exit_code == 0, result.output
    assert f"{len(done) - 1} were already complete" in result.output
    assert shard_bytes(shards) == shard_bytes(reference)
    assert verify.verify_shards(shards) == [] and temporaries(shards) == []


def test_two_concurrent_generators_in_one_directory_complete_one_verified_set(reference, model_dir, tmp_path,
                                                                             cli_env):
    shards = tmp_path / "shards"
    runs = [gen_process(shards, model_dir, cli_env) for _ in range(2)]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for status, stderr in outcomes:  # each finishes, or refuses in one line
        assert status == 0 or (status == 1 and stderr.strip().count("\n") == 0 and stderr.startswith("Error: ")), \
            stderr[-2000:]
    assert 0 in [status for status, _ in outcomes]
    assert verify.verify_shards(shards) == [] and shard_bytes(shards) == shard_bytes(reference)
    assert temporaries(shards) == []


# ---- training ----------------------------------------------------------------------------------------------

# After the first mid-epoch checkpoint of epoch 1 is saved, start writing another and die half-way through
# it: the run leaves a finished checkpoint and a stale temporary, as a kill during a save does.
KILL_WHILE_SAVING = """
import os, signal
import clsp.io, clsp.train.trainer as trainer
save = trainer.save_checkpoint
def save_then_die_saving(path, state, settings):
    save(path, state, settings)
    if state["epoch"] == 1 and state["step_in_epoch"] > 0:
        clsp.io.torch.save = lambda obj, stream: (stream.write(b"partial"), os.kill(os.getpid(), signal.SIGKILL))
        save(path, state, settings)
trainer.save_checkpoint = save_then_die_saving
"""


def test_killed_training_resumes_to_the_uninterrupted_encoder_without_stale_temporaries(trainer_shards, tmp_path,
                                                                                     cli_env):
    args = ["--shards", str(trainer_shards), "--epochs", "2", "--augment", "cpu", "--checkpoint-steps", "2",
            "--seed", "7", *tiny("moco")]
    straight = clsp_train("--out", str(tmp_path / "straight"), *args, env=cli_env)  # runs meanwhile
    resumed = tmp_path / "resumed"
    killed = clsp_train("--out", str(resumed), *args, env=cli_env, harness=KILL_WHILE_SAVING)
    assert killed.wait(timeout=300) == -9, killed.stdout.read()
    state = load_torch(resumed / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (1, 2)
    assert len(temporaries(resumed)) == 1 and not (resumed / "encoder.safetensors").exists()
    rerun = clsp_train("--out", str(resumed), *args, env=cli_env)
    for run in (rerun, straight):
        assert run.wait(timeout=300) == 0, run.stdout.read()
    assert temporaries(resumed) == []
    a = load_torch(resumed / "checkpoint.pt")["model"]
    b = load_torch(tmp_path / "straight" / "checkpoint.pt")["model"]
    assert set(a) == set(b) and any(k.startswith("queue1") for k in a)  # MoCo's queues are checkpointed too
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    mine, theirs = (load_file(str(run / "encoder.safetensors")) for run in (resumed, tmp_path / "straight"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert (resumed / "encoder.json").read_text().replace(str(resumed), "OUT") == \
        (tmp_path / "straight" / "encoder.json").read_text().replace(str(tmp_path / "straight"), "OUT")


# ---- clsp run ----------------------------------------------------------------------------------------------

def report_numbers(run_dir: Path) -> dict:
    """Every result of every run (timings excluded), to compare two reports."""
    results = {}
    for run_results in sorted((run_dir / "eval").glob(f"*/{RESULTS_FILE}")):
        data = json.loads(run_results.read_text().replace(str(run_dir), "RUN_DIR"))
        results[run_results.parent.name] = {
            cmd: {ds: {k: v for k, v in payload.items() if "time" not in k and "seconds" not in k}
                  for ds, payload in per_ds.items()} for cmd, per_ds in data.items()}
    return results


def test_killed_pipeline_reruns_to_the_uninterrupted_report_with_a_valid_state(pipeline_reference, pipeline_model,
                                                                              tmp_path, cli_env):
    killed = tmp_path / "killed"
    config = reduced_config(tmp_path, pipeline_model, killed)
    kill_when(lambda: finished_shards(killed / "shards") >= 1, clsp_run(config, cli_env))  # during generation
    manifest = json.loads((killed / "shards" / reader.MANIFEST).read_text())
    assert len(manifest["shards"]) < manifest["num_shards"]
    kill_when(lambda: (killed / "train" / "clsp" / "tensorboard").exists(), clsp_run(config, cli_env))  # training
    assert not (killed / "report.md").exists()
    rerun = clsp_run(config, cli_env)
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output
    state = json.loads((killed / STATE_FILE).read_text())
    assert state == Pipeline(load_config(config)).fingerprints()  # every stage recorded, with its fingerprint
    assert report_numbers(killed) == report_numbers(pipeline_reference) != {}
    same_report = (killed / "report.md").read_text().replace(str(killed), "RUN_DIR")
    assert same_report == (pipeline_reference / "report.md").read_text().replace(str(pipeline_reference), "RUN_DIR")
    assert temporaries(killed) == []


# ---- a loss that is no longer finite -----------------------------------------------------------------------

def test_a_non_finite_loss_stops_training_in_one_line_without_an_encoder(trainer_shards, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from clsp.train import trainer
    from clsp.train.cli import train

    views = trainer.Trainer._views
    monkeypatch.setattr(trainer.Trainer, "_views", lambda self, batch, step: tuple(
        None if x is None else x * float("nan") for x in views(self, batch, step)))
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["--shards", str(trainer_shards), "--out", str(out), "--epochs", "1",
                                        "--log-every", "1", *tiny("simclr")])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "loss became nan at step" in lines[0], result.output
    assert not (out / "encoder.safetensors").exists() and not (out / "encoder.json").exists()
