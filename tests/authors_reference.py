"""The authors' DDPM U-Net written from the structure ``fixtures/authors-unet-state-dict.json`` describes (their
``models/unet.py``: a time embedding, an encoder with a projector head and a decoder), with their module names, so
its ``state_dict`` is a checkpoint as their training script saves it: the independent reference that the
converter's tests (``test_authors_artefacts.py``, the hostile-input modules) compare with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from clsp.generate.ddpm_cli import ddpm

LISTED = json.loads((Path(__file__).parent / "fixtures" / "authors-unet-state-dict.json").read_text())["configurations"]
CIFAR10, SMALL = (next(v for k, v in LISTED.items() if k.startswith(prefix))
                  for prefix in ("diffusion_cifar10", "small"))
# the JSON's small configuration, at 16x16 images
T, CH, MULT, ATTN, BLOCKS, SIZE = 1000, 32, [1, 2, 2], [1], 1, 16
CIFAR10_CONFIG = {"T": 1000, "channel": 128, "channel_mult": [1, 2, 2, 2], "attn": [1], "num_res_blocks": 2,
                  "dropout": 0.1, "img_size": 32, "beta_1": 1e-4, "beta_T": 0.02}


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


class Encoder(nn.Module):
    """head; per level num_res_blocks ResBlocks (+ DownSample but at the last); middle ResBlock(attn), ResBlock;
    and a projector head on the pooled bottleneck that no noise prediction reads. Its skips: the head's output,
    then every down block's."""

    def __init__(self, ch: int, ch_mult: list[int], attn: list[int], num_res_blocks: int, dropout: float):
        super().__init__()
        tdim = 4 * ch
        self.head = nn.Conv2d(3, ch, 3, padding=1)
        self.downblocks, self.skip_channels, now = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.downblocks.append(ResBlock(now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
                self.skip_channels.append(now)
            if level != len(ch_mult) - 1:
                self.downblocks.append(DownSample(now))
                self.skip_channels.append(now)
        self.middleblocks = nn.ModuleList([ResBlock(now, now, tdim, dropout, True),
                                           ResBlock(now, now, tdim, dropout, False)])
        self.projector = nn.Sequential(nn.Linear(now, 4 * now), nn.BatchNorm1d(4 * now), nn.ReLU(),
                                       nn.Linear(4 * now, 256))
        self.channels = now

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.head(x)
        skips = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            skips.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        return h, skips


class Decoder(nn.Module):
    """Per level, deepest first, num_res_blocks + 1 ResBlocks on [h, popped skip] (+ UpSample but at level 0);
    tail."""

    def __init__(self, ch: int, ch_mult: list[int], attn: list[int], num_res_blocks: int, dropout: float,
                 skip_channels: list[int], now: int):
        super().__init__()
        tdim, skip_channels = 4 * ch, list(skip_channels)
        self.upblocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.upblocks.append(ResBlock(skip_channels.pop() + now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
            if level != 0:
                self.upblocks.append(UpSample(now))
        self.tail = nn.Sequential(nn.GroupNorm(32, now), Swish(), nn.Conv2d(now, 3, 3, padding=1))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        for layer in self.upblocks:
            if isinstance(layer, ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, temb)
        return self.tail(h)


class ReferenceUNet(nn.Module):
    """temb = time_embedding(t); h, skips = encoder(x, temb); eps = decoder(h, skips, temb)."""

    def __init__(self, steps: int, ch: int, ch_mult: list[int], attn: list[int], num_res_blocks: int, dropout: float):
        super().__init__()
        self.time_embedding = TimeEmbedding(steps, ch, 4 * ch)
        self.encoder = Encoder(ch, ch_mult, attn, num_res_blocks, dropout)
        self.decoder = Decoder(ch, ch_mult, attn, num_res_blocks, dropout, self.encoder.skip_channels,
                               self.encoder.channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(t)
        return self.decoder(*self.encoder(x, temb), temb)

    def interpolated(self, x: torch.Tensor, t: torch.Tensor, anchor: torch.Tensor, w: float) -> torch.Tensor:
        """The CLSP prediction: the bottleneck mixed with the noised anchor's, the sample's own skips."""
        temb = self.time_embedding(t)
        h, skips = self.encoder(x, temb)
        h_anchor, _ = self.encoder(anchor, temb)
        return self.decoder(w * h + (1 - w) * h_anchor, skips, temb)


def listing(state: dict) -> dict[str, list]:
    """A state_dict as the JSON lists it: name -> [dtype, *shape]."""
    return {name: [str(t.dtype).removeprefix("torch."), *t.shape] for name, t in state.items()}


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
    """Interpolated DDIM (METHOD.md section 2) with the reference's own bottleneck mix; the noise is drawn in
    the sampler's order (x_T, then per step the anchor's noise and the eta noise)."""
    shape = (1, k, *anchor.shape)
    x = torch.randn(shape, generator=generator).flatten(0, 1)
    times = np.linspace(-1, len(alpha_bar) - 1, steps + 1).astype(np.int64)[::-1].tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        ab = alpha_bar[t]
        anchor_t = (math.sqrt(ab) * anchor + math.sqrt(1 - ab) * torch.randn(shape, generator=generator)).flatten(0, 1)
        eps = model.interpolated(x, torch.full((k,), t, dtype=torch.long), anchor_t, w)
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


def from_listing(listed: dict[str, list], steps: int, ch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of exactly the listed tensors (random values, the authors' fixed sinusoid table)."""
    gen = torch.Generator().manual_seed(seed)
    state = {name: torch.randn(shape, generator=gen).to(getattr(torch, dtype)) if dtype != "int64"
             else torch.tensor(7) for name, (dtype, *shape) in listed.items()}
    state["time_embedding.timembedding.0.weight"] = TimeEmbedding(steps, ch, 4 * ch).timembedding[0].weight.detach()
    return state
