"""The Slurm templates submitted to a real one-node Slurm cluster (``slurm_cluster``), on digits.

Where test_slurm_templates.py sets Slurm's variables by hand, here sbatch parses the ``#SBATCH`` lines, Slurm
deals the array tasks and the template's ``srun`` starts the per-node command. Each job's result must equal
the same command run locally. The templates ask for GPUs, more CPUs and more memory than the 2-CPU node has;
the overriding sbatch options (command-line options win over ``#SBATCH`` lines) keep everything else theirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clsp.shards import reader, verify
from slurm_cluster import SlurmCluster, free_port

SLURM = Path(__file__).resolve().parents[1] / "slurm"
BIN = Path(sys.executable).parent
LIMIT, SHARD_SIZE = 64, 16
NUM_SHARDS = LIMIT // SHARD_SIZE
GENERATE = {"limit": LIMIT, "shard_size": SHARD_SIZE, "candidates": 2, "steps": 2, "batch_size": 16, "preview": False}
TRAIN = {"method": "simclr", "backbone": "resnet-narrow", "epochs": 1, "batch_size": 16, "workers": 0,
         "precision": "fp32", "proj_hidden_dim": 64, "proj_output_dim": 32}
LAMBDA = 0.3
GEN_ARGS = ["--limit", str(LIMIT), "--shard-size", str(SHARD_SIZE), "--candidates", "2", "--steps", "2",
            "--batch-size", "16", "--no-preview"]
TRAIN_ARGS = ["--method", "simclr", "--backbone", "resnet-narrow", "--epochs", "1", "--batch-size", "16",
              "--workers", "0", "--precision", "fp32", "--proj-hidden-dim", "64", "--proj-output-dim", "32",
              "--clsp-lambda", str(LAMBDA)]
# What a one-node, 2-CPU cluster without GPUs can give (--mem=0: all of the node's memory).
ONE_TASK = ["--gres=none", "--cpus-per-task=1", "--mem=0"]
ONE_NODE = ["--nodes=1", "--gres=none", "--cpus-per-task=2", "--mem=0"]
TIMEOUT = 300
# Local runs and jobs alike (sbatch passes its environment on): one thread, so that bytes match; offline hub.
SETTINGS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def local_env() -> dict[str, str]:
    return dict(os.environ, PATH=os.pathsep.join([str(BIN), os.environ.get("PATH", "")]), **SETTINGS)


def job_env(cluster: SlurmCluster, **extra: str) -> dict[str, str]:
    """The cluster's client environment with this environment's commands first on PATH, plus the job's settings."""
    return cluster.job_env(PATH=os.pathsep.join([str(BIN), cluster.env["PATH"]]), **SETTINGS, **extra)


def sbatch(script: str, *options: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Submit a template, ``options`` overriding its ``#SBATCH`` lines; sbatch prints the job id first."""
    cmd = ["sbatch", "--parsable", f"--output={cwd}/%x-%A_%a.out", *options, str(SLURM / script)]
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(job: subprocess.Popen, cluster: SlurmCluster, cwd: Path) -> tuple[str, str]:
    """Wait for sbatch and assert it succeeded (with ``--wait``: every task did); return the job id and logs."""
    out, err = job.communicate(timeout=TIMEOUT)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(cwd.glob("*.out")))
    assert job.returncode == 0, f"{err}\n{logs}\n{cluster.logs()}"
    return out.strip(), logs


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard-*.tar"))}


def shard_list(directory: Path) -> dict[str, dict]:
    """The manifest's shard records without who wrote them (rank, world size): names, anchors, checksums."""
    return {name: record.model_dump(exclude={"rank", "world_size"})
            for name, record in reader.read_manifest(directory).shards.items()}


def pipeline_config(root: Path) -> Path:
    """The configuration every job of a test runs stages of (the templates' CLSP_CONFIG)."""
    config = {"run_dir": str(root / "run"), "dataset": {"name": "digits", "data_root": str(root / "data")},
              "generate": GENERATE, "train": {**TRAIN, "runs": {"clsp": LAMBDA}},
              "evaluate": {"linear_epochs": 2, "positives": False, "embed_plot": False}}
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same generation as one local clsp-gen process: what the jobs must reproduce byte for byte."""
    shards = tmp_path_factory.mktemp("reference") / "shards"
    done = subprocess.run([str(BIN / "clsp-gen"), "--dataset", "digits", "--shards", str(shards), *GEN_ARGS],
                          env=local_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(shard_bytes(shards)) == NUM_SHARDS
    return shards


def gen_env(cluster: SlurmCluster, root: Path, **extra: str) -> dict[str, str]:
    return job_env(cluster, CLSP_CONFIG=str(pipeline_config(root)), **extra)


@pytest.mark.slow
def test_array_job_writes_the_same_shards_as_one_local_process(slurm_cluster, reference, tmp_path):
    shards = tmp_path / "run" / "shards"
    _, logs = finish(sbatch("gen-array.sbatch", "--wait", "--array=0-1", *ONE_TASK,
                            env=gen_env(slurm_cluster, tmp_path), cwd=tmp_path), slurm_cluster, tmp_path)
    assert "--only generate: array task 0 of 2" in logs and "--only generate: array task 1 of 2" in logs
    got = {r.index: (r.rank, r.world_size) for r in reader.read_manifest(shards).shards.values()}
    assert got == {i: (i % 2, 2) for i in range(NUM_SHARDS)}  # Slurm's task ids dealt the shards
    assert shard_list(shards) == shard_list(reference)
    assert shard_bytes(shards) == shard_bytes(reference)
    assert verify.verify_shards(shards) == []
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert list(state) == ["generate"]  # the task that completed the set recorded the stage for clsp run


@pytest.mark.slow
def test_after_scancel_of_a_task_resubmitting_it_finishes_the_set(slurm_cluster, reference, tmp_path):
    shards = tmp_path / "run" / "shards"
    # Held, so that task 1 is cancelled before it writes anything (a race with a running task would be flaky).
    first, _ = finish(sbatch("gen-array.sbatch", "--hold", "--array=0-1", *ONE_TASK,
                             env=gen_env(slurm_cluster, tmp_path), cwd=tmp_path), slurm_cluster, tmp_path)
    slurm_cluster.run("scancel", f"{first}_1")
    # The template's documented rerun of one task (keep the array size, submit that index), queued behind the
    # first array so that one sbatch --wait covers both.
    rerun = sbatch("gen-array.sbatch", "--wait", "--array=1", f"--dependency=afterany:{first}", *ONE_TASK,
                   env=gen_env(slurm_cluster, tmp_path, CLSP_NUM_WORKERS="2"), cwd=tmp_path)
    slurm_cluster.run("scontrol", "release", first)
    second, _ = finish(rerun, slurm_cluster, tmp_path)
    assert not (tmp_path / f"clsp-gen-{first}_1.out").exists()  # the cancelled task never ran
    assert "2 of 4 shards complete so far" in (tmp_path / f"clsp-gen-{first}_0.out").read_text()
    rerun_log = (tmp_path / f"clsp-gen-{second}_1.out").read_text()
    assert "(2 already complete; 2 workers" in rerun_log and "wrote 2 shards" in rerun_log
    assert shard_list(shards) == shard_list(reference)
    assert shard_bytes(shards) == shard_bytes(reference)
    assert verify.verify_shards(shards) == []


@pytest.mark.slow
def test_multinode_train_job_runs_two_ranks_like_a_local_accelerate_launch(slurm_cluster, tmp_path):
    config = pipeline_config(tmp_path)
    run_dir = tmp_path / "run"
    done = subprocess.run([str(BIN / "clsp"), "run", str(config), "--only", "generate"], env=local_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    port = free_port()
    env = job_env(slurm_cluster, CLSP_CONFIG=str(config), CLSP_STAGE="train:clsp", GPUS_PER_NODE="2",
                  MASTER_PORT=str(port))
    _, logs = finish(sbatch("train-multinode.sbatch", "--wait", *ONE_NODE, env=env, cwd=tmp_path), slurm_cluster,
                     tmp_path)
    assert f"rendezvous {slurm_cluster.node}:{port}" in logs  # MASTER_ADDR: from the job's node list, by scontrol
    summary = json.loads((run_dir / "train" / "clsp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert set(json.loads((run_dir / "pipeline_state.json").read_text())) == {"generate", "train:clsp"}

    local = tmp_path / "local-run"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "clsp.train.cli", "--shards", str(run_dir / "shards"), "--out", str(local), "--data-root",
           str(tmp_path / "data"), "--allow-partial", *TRAIN_ARGS]
    done = subprocess.run(cmd, env=local_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = load_file(str(run_dir / "train" / "clsp" / "encoder.safetensors"))
    theirs = load_file(str(local / "encoder.safetensors"))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
