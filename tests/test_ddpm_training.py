"""DDPM training: the loss falls, a killed run resumes, two processes stay in sync."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline

from clsp.generate.config import DDPMJob
from clsp.generate.ddpm_presets import TINY, build_unet
from clsp.generate.ddpm_training import CHECKPOINT, make_ddpm_scheduler, train_ddpm
from clsp.generate.unet import check_compatible, load_unet
from clsp.io import load_torch

CLSP = str(Path(sys.executable).parent / "clsp")  # the installed console script


def _tiny_args(out: Path, steps: int, *extra: str) -> list[str]:
    return ["ddpm", "train", "--dataset", "digits", "--preset", "tiny", "--out", str(out), "--steps", str(steps),
            "--batch-size", "8", "--sample-every", "100000", *extra]


def _denoising_loss(unet) -> float:
    """Epsilon-MSE on a fixed batch of digits, fixed timesteps and noise."""
    from clsp.datasets import get_dataset

    images = get_dataset("digits").array(range(64))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, 1000, (len(x),), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        pred = unet(make_ddpm_scheduler().add_noise(x, noise, t), t).sample
    return F.mse_loss(pred, noise).item()


def test_training_lowers_the_loss_and_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = train_ddpm(DDPMJob(name="digits", out=str(out), preset="tiny", steps=60, batch_size=16,
                                     lr=3e-3, warmup_steps=5, ema_decay=0.9, checkpoint_every=1000, sample_every=60))
    assert summary["steps"] == 60 and summary["world_size"] == 1 and summary["config"]["flip"] is True
    torch.manual_seed(0)
    fresh = build_unet(TINY, 16).eval()
    trained, scheduler = load_unet(str(out))
    check_compatible(trained.config, 16)
    assert _denoising_loss(trained) < 0.6 * _denoising_loss(fresh)
    pipe = DDPMPipeline.from_pretrained(out)  # diffusers' own loader reads the same folder
    assert pipe.scheduler.config.beta_end == pytest.approx(0.02)
    assert (out / "samples.png").is_file() and (out / "samples" / "step-0000060.png").is_file()
    assert any((out / "tensorboard").iterdir())
    assert json.loads((out / "training.json").read_text())["parameters"] == sum(p.numel() for p in fresh.parameters())


def test_killed_run_resumes_from_its_checkpoint(tmp_path: Path, cli_env: dict) -> None:
    out = tmp_path / "run"
    cmd = [CLSP, *_tiny_args(out, 100_000, "--checkpoint-every", "5")]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / CHECKPOINT).is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert (out / CHECKPOINT).is_file(), "no checkpoint appeared"
        time.sleep(0.5)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = int(load_torch(out / CHECKPOINT)["step"])
    assert killed_at >= 5 and killed_at % 5 == 0
    assert not (out / "model_index.json").exists()  # killed before the end: no final model

    rerun = subprocess.run([CLSP, *_tiny_args(out, killed_at + 5, "--checkpoint-every", "5")],
                           env=cli_env, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"at step {killed_at}" in rerun.stdout + rerun.stderr
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == killed_at + 5
    final = load_torch(out / CHECKPOINT)
    assert final["step"] == killed_at + 5
    assert final["ema"]["optimization_step"] == killed_at + 5  # EMA continued, not restarted


def test_resume_refuses_a_different_run(tmp_path: Path) -> None:
    from clsp.errors import UserError

    out = tmp_path / "run"
    train_ddpm(DDPMJob(name="digits", out=str(out), preset="tiny", steps=2, batch_size=4, sample_every=1000))
    with pytest.raises(UserError, match="other settings.*batch_size"):
        train_ddpm(DDPMJob(name="digits", out=str(out), preset="tiny", steps=4, batch_size=8))
    # clsp run's own directory: the other run is passed over and the new one trains from step 0
    summary = train_ddpm(DDPMJob(name="digits", out=str(out), preset="tiny", steps=4, batch_size=8,
                                 sample_every=1000), start_over=True)
    assert summary["resumed_from_step"] is None and summary["steps"] == 4
    assert load_torch(out / CHECKPOINT)["settings"]["batch_size"] == 8


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(tmp_path: Path, cli_env: dict) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    out = tmp_path / "run"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           CLSP, *_tiny_args(out, 6, "--checkpoint-every", "3")]
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["weights_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert load_torch(out / CHECKPOINT)["step"] == 6
    load_unet(str(out))
