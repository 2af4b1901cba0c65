"""Loading diffusers U-Nets: local layouts, clear refusals, offline hub ids, the shipped digits model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from clsp.errors import UserError
from clsp.generate.conditional import num_classes
from clsp.generate.ddpm_presets import PRESETS, build_unet
from clsp.generate.unet import check_compatible, load_unet, resolve_unet, sample_images
from support import make_scheduler, make_tiny_unet

CLSP = str(Path(sys.executable).parent / "clsp")  # the installed console script


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_loads_a_save_pretrained_folder(tiny_model_dir: Path) -> None:
    unet, scheduler = load_unet(str(tiny_model_dir))
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDPMScheduler)
    assert not unet.training
    assert _same_weights(unet, make_tiny_unet())
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.beta_end == pytest.approx(0.02)
    check_compatible(unet.config, 16)


def test_loads_a_ddpm_pipeline_folder(tmp_path: Path) -> None:
    DDPMPipeline(unet=make_tiny_unet(), scheduler=make_scheduler()).save_pretrained(tmp_path / "pipe")
    unet, scheduler = load_unet(str(tmp_path / "pipe"))
    assert _same_weights(unet, make_tiny_unet())
    assert scheduler.config.num_train_timesteps == 1000


def test_scheduler_in_a_subfolder(tmp_path: Path) -> None:
    make_tiny_unet().save_pretrained(tmp_path / "m")
    make_scheduler().save_pretrained(tmp_path / "m" / "scheduler")
    assert load_unet(str(tmp_path / "m"))[1].config.beta_start == pytest.approx(1e-4)


def test_folder_without_scheduler_is_refused(tmp_path: Path) -> None:
    make_tiny_unet().save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match="scheduler_config.json"):
        load_unet(str(tmp_path / "m"))


def test_folder_without_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no diffusers U-Net"):
        load_unet(str(tmp_path))


def test_mismatched_image_size_names_the_fitting_one(tiny_unet: UNet2DModel) -> None:
    with pytest.raises(UserError, match="--image-size 16"):
        check_compatible(tiny_unet.config, 32)


def test_mismatched_channels_are_refused(tiny_unet: UNet2DModel) -> None:
    with pytest.raises(UserError, match="channels"):
        check_compatible(tiny_unet.config, 16, channels=1)


def test_offline_uncached_hub_id_is_one_clear_line(tmp_path: Path, cli_env: dict) -> None:
    env = dict(cli_env, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([CLSP, "ddpm", "sample", "--unet", "nobody/no-such-ddpm",
                           "--out", str(tmp_path / "s.png")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "nobody/no-such-ddpm" in error[0] and "HF_HUB_OFFLINE" in error[0]


def test_defaults_per_dataset() -> None:
    assert resolve_unet(None, "cifar10") == "google/ddpm-cifar10-32"
    assert Path(resolve_unet(None, "digits")).name == "digits-ddpm"
    assert resolve_unet("my/model", "digits") == "my/model"
    with pytest.raises(UserError, match="clsp ddpm train --dataset stl10"):
        resolve_unet(None, "stl10")
    assert Path(resolve_unet(None, "digits", conditional=True)).name == "digits-ddpm-cond"
    assert resolve_unet("my/model", "digits", conditional=True) == "my/model"
    with pytest.raises(UserError, match="no class-conditional diffusion model is known for .cifar10.*--conditional"):
        resolve_unet(None, "cifar10", conditional=True)


def test_shipped_conditional_digits_model_draws_each_label() -> None:
    """The shipped class-conditional model: 10 digit classes plus the null class, loadable offline, and its
    guided samples differ by label (the class embedding is not the zero start)."""
    unet, scheduler = load_unet(resolve_unet(None, "digits", conditional=True))
    assert num_classes(unet) == 10
    check_compatible(unet.config, 16)
    noise = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        eps = unet(noise, 500, class_labels=torch.tensor([1, 8])).sample  # rows 1 and 8: digits 0 and 7
    assert (eps[0] - eps[1]).abs().mean() > 1e-3


def test_ddpm_cifar_preset_is_the_35_7m_model() -> None:
    unet = build_unet(PRESETS["ddpm-cifar"], 32)
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=0.002)


def test_shipped_digits_model_loads_offline_and_draws_images() -> None:
    path = Path(resolve_unet(None, "digits"))
    weights = path / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size < 8 * 2**20
    unet, scheduler = load_unet(str(path))
    check_compatible(unet.config, 16)
    images = sample_images(unet, scheduler, 4, steps=5)
    assert images.shape == (4, 16, 16, 3) and images.std() > 10  # not a blank or constant image


def test_fid_without_torch_fidelity_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    from clsp.generate.ddpm_cli import ddpm

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import now raises ImportError
    result = CliRunner().invoke(ddpm, ["fid", "--unet", str(tiny_model_dir), "--dataset", "digits"])
    assert result.exit_code == 1
    assert "pip install clsp[fid]" in result.output
