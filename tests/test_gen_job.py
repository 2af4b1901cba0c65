"""clsp-gen end to end: a tiny real U-Net on digits, real shards, real ranks from ``accelerate launch``.

Byte-identity needs the same thread count everywhere: subprocesses get ``OMP_NUM_THREADS=1`` and the
in-process runs pin ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.generate.cli import gen
from clsp.generate.job import anchor_seed, array_worker, assigned_shards
from clsp.shards import reader, verify, writer
from clsp.shards.preview import MIN_CELL, PAD
from support import CANDIDATES, JOB, LIMIT, NUM_SHARDS, free_port, make_tiny_unet, run_gen, shard_bytes


def records(directory: Path) -> dict[int, dict]:
    return {r.index: r.model_dump() for r in reader.read_manifest(directory).shards.values()}


def test_one_process_run_writes_verified_shards_with_labels_seeds_and_preview(reference):
    manifest = reader.read_manifest(reference).model_dump(mode="json")
    assert manifest["num_shards"] == NUM_SHARDS and len(shard_bytes(reference)) == NUM_SHARDS
    assert verify.verify_shards(reference) == []
    generation = manifest["generation"]
    assert (generation["candidates"], generation["interpolation"], generation["steps"],
            generation["limit"]) == (2, 0.1, 3, 24)
    assert len(generation["unet_sha256"]) == 16
    assert {(r["rank"], r["world_size"]) for r in records(reference).values()} == {(0, 1)}
    labels = get_dataset("digits").labels()
    samples = list(reader.ShardDirectory.open(reference).samples())
    assert [s.anchor_index for s in samples] == list(range(LIMIT))
    assert all(s.positives.shape == (CANDIDATES, 16, 16, 3) for s in samples)
    assert [s.label for s in samples] == labels[:LIMIT].tolist()
    assert [s.seed for s in samples] == [anchor_seed(0, i) for i in range(LIMIT)]
    assert len({s.seed for s in samples}) == LIMIT
    # an anchor's candidates differ from each other (each from its own x_T)
    assert all(not np.array_equal(s.positives[0], s.positives[1]) for s in samples)
    with Image.open(reference / "preview.png") as png:  # 4 rows of anchor + k positives, enlarged to MIN_CELL
        assert png.format == "PNG"
        assert png.height == 4 * (MIN_CELL + PAD) + PAD and png.width >= (CANDIDATES + 1) * MIN_CELL


@pytest.mark.slow
def test_two_ranks_of_accelerate_launch_write_the_same_bytes_as_one_process(reference, model_dir, cli_env, tmp_path):
    shards = tmp_path / "shards"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "clsp.generate.cli", *JOB, "--shards", str(shards), "--unet", str(model_dir)]
    done = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    got = records(shards)
    assert {r["world_size"] for r in got.values()} == {2}
    assert {i: r["rank"] for i, r in got.items()} == {i: i % 2 for i in range(NUM_SHARDS)}
    assert shard_bytes(shards) == shard_bytes(reference)
    assert "verify: no problems" in done.stdout


def test_job_array_workers_write_disjoint_parts_whose_union_is_the_whole_set(reference, model_dir, one_thread,
                                                                                tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    first = run_gen(shards, model_dir, "--num-workers", "2", "--worker-index", "0")
    assert first.exit_code == 0, first.output
    assert writer.completed_shards(shards) == {0, 2}
    assert "2 of 3 shards complete so far" in first.output
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # the second worker takes its place from Slurm's variables
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    second = run_gen(shards, model_dir)
    assert second.exit_code == 0, second.output
    assert "verify: no problems" in second.output
    got = records(shards)
    assert {i: (r["rank"], r["world_size"]) for i, r in got.items()} == {0: (0, 2), 1: (1, 2), 2: (0, 2)}
    assert shard_bytes(shards) == shard_bytes(reference)


def test_assigned_shards_deal_each_unfinished_shard_to_exactly_one_worker():
    for num_workers in (1, 2, 3, 7):
        parts = [assigned_shards(10, w, num_workers, done={4}) for w in range(num_workers)]
        flat = sorted(i for part in parts for i in part)
        assert flat == [i for i in range(10) if i != 4]
        assert all(i % num_workers == w for w, part in enumerate(parts) for i in part)


def test_array_worker_reads_slurm_variables_and_refuses_an_index_outside_the_array():
    assert array_worker(None, None, env={}) == (1, 0)
    assert array_worker(None, None, env={"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (4, 3)
    assert array_worker(8, None, env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"}) == (8, 5)
    assert array_worker(2, 1, env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"}) == (2, 1)
    with pytest.raises(UserError, match="number Slurm arrays from 0"):
        array_worker(None, None, env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"})


@pytest.mark.parametrize("args, needle", [
    (["--interpolation", "1.5"], "--interpolation: input should be less than or equal to 1 (got 1.5)"),
    (["--interpolation", "-0.1"], "--interpolation: input should be greater than or equal to 0 (got -0.1)"),
    (["--candidates", "0"], "--candidates: input should be greater than or equal to 1 (got 0)"),
    (["--steps", "1001"], "--steps: input should be less than or equal to 1000 (got 1001)"),
    (["--image-size", "24"], "trained on 16x16 images but the dataset's are 24x24"),
    (["--dataset", "no-such-data"], "unknown dataset 'no-such-data'"),
])
def test_bad_inputs_give_one_error_line(args, needle, model_dir, tmp_path):
    result = CliRunner().invoke(gen, [*JOB, "--shards", str(tmp_path / "s"), "--unet", str(model_dir), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not (tmp_path / "s").exists()  # refused before any work


def test_a_dataset_without_a_known_model_says_how_to_train_one(tmp_path):
    result = CliRunner().invoke(gen, ["--dataset", "cifar100", "--shards", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert re.fullmatch(r"Error: no diffusion model is known for 'cifar100'; train one with `clsp ddpm train .*\n",
                        result.output)


def test_other_settings_are_refused_unless_overwrite(reference, model_dir, one_thread, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(reference, shards)
    refused = run_gen(shards, model_dir, "--interpolation", "0.2")
    assert refused.exit_code == 1 and refused.output.startswith("Error: ") and "--overwrite" in refused.output
    assert "generation.interpolation: 0.1 -> 0.2" in refused.output
    assert shard_bytes(shards) == shard_bytes(reference)  # untouched
    same = run_gen(shards, model_dir, "--no-preview")  # same settings: nothing to redo
    assert same.exit_code == 0 and "wrote 0 shards" in same.output
    assert f"{NUM_SHARDS} were already complete" in same.output
    replaced = run_gen(shards, model_dir, "--interpolation", "0.2", "--overwrite", "--no-preview")
    assert replaced.exit_code == 0, replaced.output
    assert reader.read_manifest(shards).generation["interpolation"] == 0.2
    new, old = shard_bytes(shards), shard_bytes(reference)
    assert new.keys() == old.keys() and all(new[k] != old[k] for k in new)
    assert verify.verify_shards(shards) == []


def test_a_changed_model_at_the_same_path_is_refused(model_dir, one_thread, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    shards = tmp_path / "shards"
    assert run_gen(shards, model, "--limit", "8", "--no-preview").exit_code == 0
    unet = make_tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.add_(0.01)
    unet.save_pretrained(model)
    refused = run_gen(shards, model, "--limit", "8", "--no-preview")
    assert refused.exit_code == 1 and "generation.unet_sha256" in refused.output


def test_the_datasets_shipped_model_is_recorded_by_name_not_by_install_path(tmp_path, one_thread):
    """Shards made with the default model stay valid when the package is installed elsewhere."""
    shards = tmp_path / "shards"
    job = ["--dataset", "digits", "--limit", "4", "--shard-size", "4", "--candidates", "1", "--steps", "1",
           "--precision", "fp32", "--no-scores", "--shards", str(shards)]
    result = CliRunner().invoke(gen, job)
    assert result.exit_code == 0, result.output
    generation = reader.read_manifest(shards).generation
    assert generation["unet"] == "default for digits: digits-ddpm"
    assert str(Path(__file__).parent.parent) not in str(generation)
