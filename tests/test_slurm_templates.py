"""The Slurm templates, run locally with Slurm's variables set by hand on a tiny model and digits.

Each template runs whole under bash (``#SBATCH`` lines are comments to bash). The multi-node one starts
its per-node command through ``srun``; on one node srun runs that command once, which the ``srun`` put
first on PATH here does (it drops srun's own options and runs the rest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clsp.shards import reader, verify
from conftest import make_scheduler, make_tiny_unet

SLURM = Path(__file__).resolve().parents[1] / "slurm"
TEMPLATES = ("gen-array.sbatch", "gen-multinode.sbatch")
GEN_ARGS = "--limit 24 --shard-size 8 --candidates 2 --steps 3 --batch-size 4 --precision fp32"


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict[str, str]:
    """Environment of a job: the tiny model and digits through the templates' variables, srun on PATH."""
    root = tmp_path_factory.mktemp("slurm")
    model = root / "tiny-ddpm"
    make_tiny_unet().save_pretrained(model)
    make_scheduler().save_pretrained(model)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CLSP_DATASET="digits", CLSP_UNET=str(model),
               CLSP_GEN_ARGS=GEN_ARGS, SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="1")
    return env


def run_template(name: str, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(SLURM / name)], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(job: subprocess.Popen) -> str:
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    return out


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_have_a_shebang_sbatch_lines_and_an_adaptation_guide(name):
    text = (SLURM / name).read_text()
    assert text.startswith("#!/bin/bash\n") and re.search(r"^#SBATCH --time=", text, re.M)
    assert "How to adapt it:" in text
    subprocess.run(["bash", "-n", str(SLURM / name)], check=True)


@pytest.mark.slow
def test_array_template_tasks_together_write_the_complete_set_once(job_env, tmp_path):
    tasks = [run_template("gen-array.sbatch", dict(job_env, SLURM_ARRAY_JOB_ID="4242", SLURM_ARRAY_TASK_ID=str(i),
                                                   SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0",
                                                   SLURM_ARRAY_TASK_MAX="1"), tmp_path) for i in range(2)]
    for task in tasks:  # both at once, as Slurm would run them
        finish(task)
    shards = tmp_path / "shards" / "digits"  # the template's default directory
    got = {r.index: (r.rank, r.world_size) for r in reader.read_manifest(shards).shards.values()}
    assert got == {0: (0, 2), 1: (1, 2), 2: (0, 2)}
    assert verify.verify_shards(shards) == []
    assert (shards / "preview.png").is_file()


@pytest.mark.slow
def test_multinode_template_forms_one_process_group_over_its_processes(job_env, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(job_env, CLSP_SHARDS=str(tmp_path / "out"), SLURM_NNODES="1", SLURM_NODEID="0", SLURM_PROCID="0",
               SLURM_JOB_NODELIST="localhost", GPUS_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = finish(run_template("gen-multinode.sbatch", env, tmp_path))
    assert "verify: no problems" in out
    got = {r.index: (r.rank, r.world_size) for r in reader.read_manifest(tmp_path / "out").shards.values()}
    assert got == {0: (0, 2), 1: (1, 2), 2: (0, 2)}
