"""The Slurm templates, run locally with Slurm's variables set by hand on a tiny model and digits.

Each template runs whole under bash (``#SBATCH`` lines are comments to bash) and runs one stage of a
pipeline configuration (``clsp run CONFIG --only STAGE``). The multi-node ones start their per-node
command through ``srun``; on one node srun runs that command once, which the ``srun`` put first on PATH
here does (it drops srun's own options and runs the rest). Afterwards ``clsp run CONFIG`` must recognise
the finished stages and do only what is left.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clsp.shards import reader, verify
from support import make_scheduler, make_tiny_unet

SLURM = Path(__file__).resolve().parents[1] / "slurm"
TEMPLATES = ("gen-array.sbatch", "gen-multinode.sbatch", "train-multinode.sbatch")


def tiny_pipeline(root: Path, model: Path) -> Path:
    """A pipeline configuration small enough for a test: 24 anchors, one epoch, two quick evaluations."""
    config = {
        "run_dir": str(root / "run"), "seed": 0, "dataset": {"name": "digits"}, "diffusion": {"unet": str(model)},
        "generate": {"limit": 24, "shard_size": 8, "candidates": 2, "steps": 3, "batch_size": 4,
                     "precision": "fp32"},
        "train": {"method": "simclr", "backbone": "resnet-narrow", "epochs": 1, "batch_size": 8, "workers": 0,
                  "precision": "fp32", "proj_hidden_dim": 64, "runs": {"clsp": 0.3}},
        "evaluate": {"linear_epochs": 2, "positives": False, "embed_plot": False},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict[str, str]:
    """Environment of a job: the configuration through CLSP_CONFIG, srun on PATH, no inherited Slurm state."""
    root = tmp_path_factory.mktemp("slurm")
    model = root / "tiny-ddpm"
    make_tiny_unet().save_pretrained(model)
    make_scheduler().save_pretrained(model)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CLSP_"))}
    env.update(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CLSP_CONFIG=str(tiny_pipeline(root, model)),
               SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="1")
    return env


def run_template(name: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SLURM / name)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(job: subprocess.Popen) -> str:
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multinode_env(job_env: dict[str, str], **extra: str) -> dict[str, str]:
    return dict(job_env, SLURM_NNODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_JOB_NODELIST="localhost",
                GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **extra)


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_have_a_shebang_sbatch_lines_and_an_adaptation_guide(name):
    text = (SLURM / name).read_text()
    assert text.startswith("#!/bin/bash\n") and re.search(r"^#SBATCH --time=", text, re.M)
    assert "How to adapt it:" in text and "clsp run" in text
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


@pytest.mark.slow
def test_cluster_route_runs_the_pipelines_stages_and_clsp_run_does_only_the_rest(job_env, tmp_path):
    config = Path(job_env["CLSP_CONFIG"])
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    tasks = [run_template("gen-array.sbatch", dict(job_env, SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(i),
                                                   SLURM_ARRAY_TASK_COUNT="2"), tmp_path) for i in range(2)]
    for task in tasks:  # both at once, as Slurm would run them
        finish(task)
    shards = run_dir / "shards"
    got = {r.index: (r.rank, r.world_size) for r in reader.read_manifest(shards).shards.values()}
    assert got == {0: (0, 2), 1: (1, 2), 2: (0, 2)}
    assert verify.verify_shards(shards) == []
    assert "generate" in json.loads((run_dir / "pipeline_state.json").read_text())

    finish(run_template("train-multinode.sbatch", multinode_env(job_env, CLSP_STAGE="train:clsp"), tmp_path))
    summary = json.loads((run_dir / "train" / "clsp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"]
    assert summary["batch_size"] == 8  # the configuration's global batch, split 4 + 4
    assert set(json.loads((run_dir / "pipeline_state.json").read_text())) == {"generate", "train:clsp"}

    done = subprocess.run([sys.executable, "-m", "clsp", "run", str(config)], env=job_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ran = re.search(r"\[clsp run\] ran: (.*)", done.stdout).group(1).split(", ")
    assert ran == ["eval:clsp:linear", "eval:clsp:knn"]


@pytest.mark.slow
def test_multinode_generation_forms_one_process_group_over_its_processes(job_env, tmp_path):
    out = finish(run_template("gen-multinode.sbatch", multinode_env(job_env, CLSP_SET=f"run_dir={tmp_path}/run"),
                              tmp_path))
    assert "verify: no problems" in out
    got = {r.index: (r.rank, r.world_size) for r in reader.read_manifest(tmp_path / "run" / "shards").shards.values()}
    assert got == {0: (0, 2), 1: (1, 2), 2: (0, 2)}
