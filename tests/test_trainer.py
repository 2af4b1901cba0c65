"""The training stage end to end: clsp-train on tiny real shards (digits, resnet-narrow, 16x16)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from clsp.datasets import get_dataset
from clsp.io import load_torch
from clsp.shards import writer
from clsp.train.backbones import load_encoder
from clsp.train.cli import train
from clsp.train.optim import WARMUP_START_LR, warmup_cosine_factor
from support import TRAINER_ANCHORS, make_train_shards, tiny


def test_warmup_then_cosine_schedule():
    factor = [warmup_cosine_factor(s, base_lr=0.5, warmup_steps=10, total_steps=110) for s in range(111)]
    assert factor[0] * 0.5 == pytest.approx(WARMUP_START_LR)
    assert factor[10] == pytest.approx(1.0) and factor[60] == pytest.approx(0.5) and factor[110] == pytest.approx(0.0)
    assert all(a < b for a, b in zip(factor[:10], factor[1:11]))
    assert all(a > b for a, b in zip(factor[10:], factor[11:]))


def test_baseline_run_exports_a_loadable_encoder_and_logs(trainer_shards, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train, ["--shards", str(trainer_shards), "--out", str(out), "--clsp-lambda", "0",
                                        "--epochs", "2", "--augment", "device", *tiny("simclr")])
    assert result.exit_code == 0, result.output
    assert "trained simclr resnet-narrow on digits/train: 2 epochs, 12 steps" in result.output
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 1 and summary["final"]["loss_clsp"] == 0.0  # baseline: no CLSP term
    assert 0.0 <= summary["final"]["probe_acc"] <= 1.0
    assert summary["clsp_lambda"] == 0.0 and summary["batch_size"] == 8  # the global batch
    assert summary["settings"]["crop_min_scale"] == 0.08 and summary["settings"]["flip"] is True
    encoder, card = load_encoder(out)
    assert card.method == "simclr" and card.clsp_lambda == 0.0 and card.stem == "small"
    assert card.backbone == "resnet-narrow"
    assert card.dataset["fingerprint"] == get_dataset("digits").fingerprint and card.image_size == 16
    # METHOD.md's augmentation, recorded
    assert card.settings["crop_min_scale"] == 0.08 and card.settings["flip"] is True
    card_json = json.loads((out / "encoder.json").read_text())
    assert card_json["clsp_lambda"] == 0.0 and "clsp_weight" not in card_json
    assert encoder(torch.zeros(2, 3, 16, 16)).shape == (2, encoder.feature_dim)
    exported = load_file(str(out / "encoder.safetensors"))
    checkpoint = load_torch(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["step_in_epoch"] == 0
    assert torch.equal(exported["conv1.weight"], checkpoint["model"]["backbone.conv1.weight"])
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # a rerun finds the finished checkpoint and trains nothing more
    again = CliRunner().invoke(train, ["--shards", str(trainer_shards), "--out", str(out), "--clsp-lambda", "0",
                                       "--epochs", "2", "--augment", "device", *tiny("simclr")])
    assert again.exit_code == 0 and torch.equal(load_file(str(out / "encoder.safetensors"))["conv1.weight"],
                                                exported["conv1.weight"])
    # ... but not with another augmentation
    other = CliRunner().invoke(train, ["--shards", str(trainer_shards), "--out", str(out), "--clsp-lambda", "0",
                                       "--epochs", "2", "--augment", "device", "--no-flip", *tiny("simclr")])
    assert other.exit_code != 0 and "flip: True there, False now" in other.output, other.output


@pytest.mark.slow
def test_two_processes_train_in_sync(trainer_shards, tmp_path, cli_env):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    out = tmp_path / "ddp"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "clsp.train.cli", "--shards", str(trainer_shards), "--out", str(out),
           "--epochs", "1", "--augment", "device", *tiny("nnclr")]
    run = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    # global batch 8 = 2 x 4
    assert summary["world_size"] == 2 and summary["batch_size"] == 8 and summary["steps"] == TRAINER_ANCHORS // 8
    assert len(summary["rank_checksums"]) == 2 and summary["ranks_in_sync"] is True
    assert "nn_acc" in summary["final"]
    load_encoder(out)


def _other_dataset_shards(directory: Path) -> Path:
    """Shards whose manifest names digits but was made from other images (another fingerprint)."""
    identity = {**get_dataset("digits").describe(), "fingerprint": "0123456789abcdef"}
    writer.init_manifest(directory, dataset=identity, generation={}, num_anchors=8, shard_size=8)
    return directory


@pytest.mark.parametrize("case", ["other-dataset", "empty", "unverified", "unknown-method", "batch-too-large",
                                  "crop-min-scale"])
def test_bad_inputs_give_one_error_line(case, trainer_shards, tmp_path):
    shards, extra = str(trainer_shards), tiny("nnclr")
    if case == "other-dataset":
        shards = str(_other_dataset_shards(tmp_path / "other"))
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        shards = str(tmp_path / "empty")
    elif case == "unverified":
        directory = make_train_shards(tmp_path / "unverified", num_anchors=8, shard_size=8)
        (directory / "shard-000000.tar").write_bytes(b"not a tar")
        shards = str(directory)
    elif case == "unknown-method":
        extra += ["--method", "byol"]
    elif case == "crop-min-scale":
        extra += ["--crop-min-scale", "0"]
    else:
        extra += ["--batch-size", "64"]
    args = ["--shards", shards, "--out", str(tmp_path / "out"), *extra]
    result = CliRunner().invoke(train, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (RuntimeError, ValueError, KeyError))
    expected = {"other-dataset": "fingerprint", "empty": "no manifest", "unverified": "passes verification",
                "unknown-method": "byol", "batch-too-large": "larger than the 48 anchors",
                "crop-min-scale": "--crop-min-scale: input should be greater than 0"}[case]
    assert expected in errors[0]
