"""Shared fixtures: tiny real diffusers models and small real datasets, so tests take seconds."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads: OpenMP threads that spin-wait turn a busy 2-core machine into a crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from support import (
    TRAINER_ANCHORS,
    clsp_run,
    command_env,
    make_tiny_unet,
    make_train_shards,
    reduced_config,
    run_gen,
    save_tiny_model,
)

torch.set_num_threads(1)  # tiny models: a second thread mostly waits


@pytest.fixture(scope="session")
def one_thread():
    """For tests comparing bytes with subprocess runs (OMP_NUM_THREADS=1): pin one thread explicitly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "tiny-ddpm")


@pytest.fixture
def cli_env() -> dict[str, str]:
    return command_env()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model shared by a module's generation runs."""
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny-ddpm")


@pytest.fixture(scope="module")
def reference(model_dir, one_thread, tmp_path_factory) -> Path:
    """An uninterrupted one-process clsp-gen run: what every other way of running must reproduce."""
    shards = tmp_path_factory.mktemp("reference") / "shards"
    result = run_gen(shards, model_dir)
    assert result.exit_code == 0, result.output
    return shards


@pytest.fixture(scope="module")
def trainer_shards(tmp_path_factory) -> Path:
    """Training shards of digits anchors, for the training runs of a module."""
    return make_train_shards(tmp_path_factory.mktemp("train-shards"), num_anchors=TRAINER_ANCHORS, shard_size=16)


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
