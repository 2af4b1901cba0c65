"""The authors' artefacts: their DDPM checkpoints (``clsp ddpm convert``) and synthetic sets (``clsp shards import``).

The reference U-Net below is written from the published description of the DDPM architecture the authors use
(Ho et al.; the PyTorch re-implementation with ``UNet(T, ch, ch_mult, attn, num_res_blocks, dropout)``), with
that code's module names, so its ``state_dict`` is a checkpoint as their training script saves it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from clsp.datasets import get_dataset
from clsp.generate.cli import gen
from clsp.generate.ddpm_cli import ddpm
from clsp.generate.job import anchor_seed
from clsp.generate.unet import load_unet
from clsp.images import to_float
from clsp.shards import reader
from clsp.shards.cli import shards
from clsp.train.cli import train
from support import tiny

T, CH, MULT, ATTN, BLOCKS, SIZE = 1000, 32, [1, 2], [1], 1, 16


# --- the reference architecture ---------------------------------------------------------------------------------

class Swish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class TimeEmbedding(nn.Module):
    """Fixed table of interleaved sinusoids (sin, cos per frequency), then Linear - Swish - Linear."""

    def __init__(self, steps: int, ch: int, dim: int):
        super().__init__()
        position = torch.arange(steps, dtype=torch.float32)[:, None]
        frequency = torch.exp(-math.log(10000) * torch.arange(0, ch, 2, dtype=torch.float32) / ch)[None]
        table = torch.stack([torch.sin(position * frequency), torch.cos(position * frequency)], dim=-1).view(steps, ch)
        self.timembedding = nn.Sequential(nn.Embedding.from_pretrained(table), nn.Linear(ch, dim), Swish(),
                                          nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)


class AttnBlock(nn.Module):
    """Single-head self-attention over positions with 1x1-conv projections, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(32, ch)
        self.proj_q, self.proj_k, self.proj_v, self.proj = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x)
        q = self.proj_q(y).flatten(2).transpose(1, 2)  # [B, HW, C]
        k = self.proj_k(y).flatten(2)  # [B, C, HW]
        v = self.proj_v(y).flatten(2).transpose(1, 2)
        weights = torch.softmax(q @ k / math.sqrt(c), dim=-1)
        return x + self.proj((weights @ v).transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, dropout: float, attn: bool):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(32, cin), Swish(), nn.Conv2d(cin, cout, 3, padding=1))
        self.temb_proj = nn.Sequential(Swish(), nn.Linear(tdim, cout))
        self.block2 = nn.Sequential(nn.GroupNorm(32, cout), Swish(), nn.Dropout(dropout),
                                    nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = AttnBlock(cout) if attn else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(x) + self.temb_proj(temb)[:, :, None, None])
        return self.attn(h + self.shortcut(x))


class DownSample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class UpSample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.main = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2, mode="nearest"))


class ReferenceUNet(nn.Module):
    """head; per level num_res_blocks ResBlocks (+ DownSample but at the last); middle ResBlock(attn), ResBlock;
    per level, deepest first, num_res_blocks + 1 ResBlocks on [h, skip] (+ UpSample but at level 0); tail."""

    def __init__(self, steps: int, ch: int, ch_mult: list[int], attn: list[int], num_res_blocks: int, dropout: float):
        super().__init__()
        tdim = 4 * ch
        self.time_embedding = TimeEmbedding(steps, ch, tdim)
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        self.downblocks, skips, now = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now))
                skips.append(now)
        self.middleblocks = nn.ModuleList([ResBlock(now, now, tdim, dropout, True),
                                           ResBlock(now, now, tdim, dropout, False)])
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(skips.pop() + now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
            if level != 0:
                self.upblocks.append(UpSample(now))
        self.tail = nn.Sequential(nn.GroupNorm(32, now), Swish(), nn.Conv2d(now, 3, 3, padding=1))

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        temb = self.time_embedding(t)
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        return h, skips, temb

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x, t))


def reference_model(seed: int = 0, steps: int = T) -> ReferenceUNet:
    """Random weights everywhere but the fixed table (the original init zeroes biases and shrinks the attention
    and last convolutions, which would hide a wrong mapping)."""
    torch.manual_seed(seed)
    model = ReferenceUNet(steps, CH, MULT, ATTN, BLOCKS, dropout=0.1).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "time_embedding.timembedding.0.weight":
                param.copy_(torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.5) + (param.ndim == 1) * 0.1)
    return model


@torch.no_grad()
def reference_positives(model: ReferenceUNet, alpha_bar: list[float], anchor: torch.Tensor, k: int, w: float,
                        steps: int, eta: float, generator: torch.Generator) -> torch.Tensor:
    """Interpolated DDIM (METHOD.md section 2) with the reference split at its bottleneck; the noise is drawn in
    the sampler's order (x_T, then per step the anchor's noise and the eta noise)."""
    shape = (1, k, *anchor.shape)
    x = torch.randn(shape, generator=generator).flatten(0, 1)
    times = np.linspace(-1, len(alpha_bar) - 1, steps + 1).astype(np.int64)[::-1].tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        ab = alpha_bar[t]
        anchor_t = (math.sqrt(ab) * anchor + math.sqrt(1 - ab) * torch.randn(shape, generator=generator)).flatten(0, 1)
        tt = torch.full((k,), t, dtype=torch.long)
        h, skips, temb = model.encode(x, tt)
        h_anchor, _, _ = model.encode(anchor_t, tt)
        eps = model.decode(w * h + (1 - w) * h_anchor, skips, temb)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if t_next < 0:
            x = x0
            break
        ab_next = alpha_bar[t_next]
        sigma = eta * math.sqrt((1 - ab / ab_next) * (1 - ab_next) / (1 - ab))
        x = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(shape, generator=generator).flatten(0, 1)
    return x.clamp(-1, 1)


def write_artefacts(directory: Path, state: dict, **config_changes) -> tuple[Path, Path]:
    """The checkpoint and the authors' YAML layout (with keys the converter does not need)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"dataset": "digits", "data_path": "./data", "T": T, "channel": CH, "channel_mult": MULT, "attn": ATTN,
              "num_res_blocks": BLOCKS, "dropout": 0.1, "img_size": SIZE, "beta_1": 1e-4, "beta_T": 0.02,
              "lr": 2e-4, "epoch": 2000, **config_changes}
    (directory / "diffusion.yaml").write_text(yaml.safe_dump(config))
    torch.save(state, directory / "ckpt.pt")
    return directory / "ckpt.pt", directory / "diffusion.yaml"


def run_convert(ckpt: Path, config: Path, out: Path, *extra: str):
    return CliRunner().invoke(ddpm, ["convert", str(ckpt), "--config", str(config), "--out", str(out), *extra])


def one_error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def convert_reference(directory: Path, steps: int = T) -> tuple[ReferenceUNet, Path]:
    """A random reference U-Net saved as the authors' checkpoint and converted by ``clsp ddpm convert``."""
    reference = reference_model(steps=steps)
    ckpt, config = write_artefacts(directory, reference.state_dict(), T=steps)
    result = run_convert(ckpt, config, directory / "converted")
    assert result.exit_code == 0, result.output
    return reference, directory / "converted"


# --- clsp ddpm convert ------------------------------------------------------------------------------------------

def test_converted_model_predicts_the_references_noise(tmp_path):
    reference, out = convert_reference(tmp_path)
    unet, scheduler = load_unet(str(out))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, SIZE, SIZE, generator=gen)
    for t in (0, 1, 500, 999):
        timesteps = torch.full((3,), t, dtype=torch.long)
        with torch.no_grad():
            expected, got = reference(x, timesteps), unet(x, timesteps).sample
        assert expected.abs().max() > 0.1  # a real prediction, not a vanishing one
        assert (got - expected).abs().max() < 1e-4, t
    assert scheduler.config.num_train_timesteps == T and scheduler.config.beta_schedule == "linear"
    assert torch.allclose(scheduler.betas, torch.linspace(1e-4, 0.02, T))
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"] == "ckpt.pt" and len(record["sha256"]) == 64 and record["authors_config"]["channel"] == CH


def test_clsp_gen_on_the_converted_folder_gives_the_references_positives(tmp_path, one_thread):
    """T = 100 here: at T = 1000 DDIM's first step divides by sqrt(alpha_bar_999) = 0.006, so a random-weight
    network's samples are all clipped to +-1 and say little, and float rounding is amplified 150 times."""
    reference, out = convert_reference(tmp_path, steps=100)
    shard_dir = tmp_path / "shards"
    k, steps, eta, w, anchors = 2, 4, 0.5, 0.1, 2
    result = CliRunner().invoke(gen, ["--dataset", "digits", "--unet", str(out), "--shards", str(shard_dir),
                                      "--limit", str(anchors), "--candidates", str(k), "--steps", str(steps),
                                      "--eta", str(eta), "--interpolation", str(w), "--precision", "fp32",
                                      "--no-scores", "--no-preview", "--shard-size", str(anchors)])
    assert result.exit_code == 0, result.output
    _, scheduler = load_unet(str(out))
    alpha_bar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).tolist()
    digits = get_dataset("digits")
    for sample in reader.ShardDirectory.open(shard_dir).samples():
        i = sample.anchor_index
        anchor = to_float(digits.array([i]), signed=True)[0]
        expected = reference_positives(reference, alpha_bar, anchor, k, w, steps, eta,
                                       torch.Generator().manual_seed(anchor_seed(0, i)))
        stored = torch.from_numpy(sample.positives).permute(0, 3, 1, 2).double()
        # the shard keeps 8 bits: each pixel is the reference's value rounded to the nearest of 256 levels
        assert (stored - (expected.double() + 1) * 127.5).abs().max() <= 0.5 + 0.01, i
        assert (expected.abs() < 0.99).float().mean() > 0.1  # not only clipped pixels


def test_training_checkpoint_with_both_weights_uses_the_chosen_one(tmp_path):
    ema, net = reference_model(0), reference_model(1)
    ckpt, config = write_artefacts(tmp_path, {"net_model": net.state_dict(), "ema_model": ema.state_dict(),
                                              "step": 10, "x_T": torch.zeros(1)})
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([250])
    for weights, model in (("ema", ema), ("net", net)):
        result = run_convert(ckpt, config, tmp_path / weights, "--weights", weights)
        assert result.exit_code == 0, result.output
        with torch.no_grad():
            got = load_unet(str(tmp_path / weights))[0](x, t).sample
            assert (got - model(x, t)).abs().max() < 1e-4, weights


@pytest.mark.parametrize("case", ["wrong-shape", "missing-key", "other-config", "not-a-checkpoint", "bad-yaml",
                                  "duplicate-key"])
def test_checkpoints_that_do_not_fit_are_refused_in_one_line(case, tmp_path):
    state = reference_model().state_dict()
    changes = {}
    if case == "wrong-shape":
        state["downblocks.0.block1.2.weight"] = torch.zeros(32, 32, 5, 5)
    elif case == "missing-key":
        del state["upblocks.1.attn.proj_k.bias"]
    elif case == "other-config":
        changes = {"channel_mult": [1, 2, 2]}
    elif case == "bad-yaml":
        changes = {"attn": [3]}
    ckpt, config = write_artefacts(tmp_path, state, **changes)
    if case == "not-a-checkpoint":
        ckpt.write_bytes(b"not a checkpoint")
    if case == "duplicate-key":  # the authors' YAML is read within the configuration budgets
        config.write_text(config.read_text() + "channel: 64\n")
    out = tmp_path / "out"
    line = one_error_line(run_convert(ckpt, config, out))
    expected = {"wrong-shape": "downblocks.0.block1.2.weight is [32, 32, 5, 5], the config needs [32, 32, 3, 3]",
                "missing-key": "upblocks.1.attn.proj_k.bias missing", "other-config": "does not fit the config",
                "not-a-checkpoint": "cannot read", "bad-yaml": "attn levels [3]",
                "duplicate-key": "duplicate key 'channel'"}[case]
    assert expected in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- clsp shards import -----------------------------------------------------------------------------------------

def authors_set(path: Path, rows: int, k: int = 2, size: int = 16, seed: int = 0) -> np.ndarray:
    """A synthetic set in the authors' layout, written as they save it (np.save of a uint8 array)."""
    positives = np.random.default_rng(seed).integers(0, 256, (rows, k, size, size, 3), dtype=np.uint8)
    np.save(path, positives)
    return positives


def test_imported_set_verifies_and_trains(tmp_path):
    digits = get_dataset("digits")
    positives = authors_set(tmp_path / "digits_positives.npy", len(digits))
    shard_dir, limit = tmp_path / "shards", 40
    args = ["import", str(tmp_path / "digits_positives.npy"), "--dataset", "digits", "--shards", str(shard_dir),
            "--shard-size", "16", "--limit", str(limit)]
    result = CliRunner().invoke(shards, args)
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(shards, ["verify", str(shard_dir)]).exit_code == 0
    store = reader.ShardDirectory.open(shard_dir)
    generation = store.manifest.generation
    assert generation["source"] == "imported" and generation["file"] == "digits_positives.npy"
    assert generation["bytes"] == (tmp_path / "digits_positives.npy").stat().st_size and len(generation["sha256"]) == 64
    samples = list(store.samples())
    assert [s.anchor_index for s in samples] == list(range(limit))
    for sample in samples:  # row i is anchor i's, byte for byte, with the dataset's label
        assert np.array_equal(sample.positives, positives[sample.anchor_index])
        assert sample.label == digits.labels()[sample.anchor_index]
    again = CliRunner().invoke(shards, args)  # a rerun finds every shard complete
    assert again.exit_code == 0 and "(3 already complete)" in again.output, again.output
    out = tmp_path / "run"
    trained = CliRunner().invoke(train, ["--shards", str(shard_dir), "--out", str(out), "--epochs", "1",
                                         "--augment", "device", *tiny("simclr")])
    assert trained.exit_code == 0, trained.output
    assert json.loads((out / "train_summary.json").read_text())["steps"] == limit // 8


@pytest.mark.parametrize("case", ["rows", "image-size", "layout", "pickled"])
def test_sets_that_do_not_fit_the_dataset_are_refused_in_one_line(case, tmp_path):
    path, rows = tmp_path / "set.npy", len(get_dataset("digits"))
    if case == "rows":
        authors_set(path, rows - 1)
    elif case == "image-size":
        authors_set(path, rows, size=32)
    elif case == "layout":
        np.save(path, np.zeros((rows, 16, 16, 3), dtype=np.uint8))
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    shard_dir = tmp_path / "shards"
    result = CliRunner().invoke(shards, ["import", str(path), "--dataset", "digits", "--shards", str(shard_dir)])
    expected = {"rows": f"has {rows - 1} rows but digits/train has {rows} images",
                "image-size": "holds 32x32 images but digits's are 16x16", "layout": "uint8 [N, k, H, W, 3]",
                "pickled": "cannot read"}[case]
    assert expected in one_error_line(result)
    assert not (shard_dir / "manifest.json").exists()
