"""Shared fixtures: tiny real diffusers models and small real datasets, so tests take seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Before torch loads: OpenMP threads that spin-wait turn a busy 2-core machine into a crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)  # tiny models: a second thread mostly waits


@pytest.fixture(scope="session")
def one_thread():
    """For tests comparing bytes with subprocess runs (OMP_NUM_THREADS=1): pin one thread explicitly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_unet(sample_size: int = 16, attention: bool = True, layers_per_block: int = 1):
    """A real diffusers UNet2DModel, small enough for CPU tests (random weights)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=layers_per_block,
                       block_out_channels=(8, 16), down_block_types=down, up_block_types=up, norm_num_groups=4)


def make_scheduler():
    """The DDPM linear schedule of METHOD.md (1e-4 .. 0.02 over 1000 steps)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny-ddpm")


def command_env() -> dict[str, str]:
    """Environment for subprocess runs of the commands: fixed threads, offline hub."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false")
    return env


@pytest.fixture
def cli_env() -> dict[str, str]:
    return command_env()


def save_tiny_model(directory: Path) -> Path:
    """A diffusers-format model folder (UNet + scheduler config) as ``save_pretrained`` writes it."""
    make_tiny_unet().save_pretrained(directory)
    make_scheduler().save_pretrained(directory)
    return directory


def reduced_config(tmp_path: Path, model_dir: Path, run_dir: Path) -> Path:
    """The repository's default pipeline.yaml, shrunk to seconds: tiny model, few anchors, one epoch."""
    config = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["diffusion"] = {"unet": str(model_dir)}
    config["generate"].update(candidates=2, steps=2, batch_size=8, shard_size=8, limit=32, precision="fp32")
    # one epoch: no lambda ramp and a one-epoch warm-up (the default's 5-epoch schedules cannot fit in it)
    config["train"].update(epochs=1, batch_size=8, backbone="resnet-narrow", precision="fp32", workers=0,
                           clsp_lambda_ramp_epochs=0, warmup_epochs=1)
    config["evaluate"].update(linear_epochs=3, embed_plot=False)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def clsp_run(config: Path, env: dict) -> subprocess.Popen:
    """``clsp run CONFIG`` in a fresh process, its output on one pipe."""
    return subprocess.Popen([sys.executable, "-m", "clsp.cli", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def pipeline_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("pipeline-model") / "tiny-ddpm")


@pytest.fixture(scope="session")
def pipeline_reference(tmp_path_factory, pipeline_model) -> Path:
    """The run directory of one uninterrupted reduced ``clsp run``: what interrupted runs must reproduce."""
    root = tmp_path_factory.mktemp("pipeline")
    process = clsp_run(reduced_config(root, pipeline_model, root / "reference"), command_env())
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return root / "reference"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster (see slurm_cluster.py), started once for the whole session."""
    from slurm_cluster import running_cluster

    with running_cluster() as cluster:
        yield cluster
