"""Convert the authors' DDPM checkpoint into a diffusers ``UNet2DModel`` folder that ``clsp-gen --unet`` loads.

The paper's positives come from the authors' own DDPM U-Nets (METHOD.md section 3), written in the widely used
PyTorch re-implementation of Ho et al.'s architecture: ``UNet(T, ch, ch_mult, attn, num_res_blocks, dropout)``
with modules ``time_embedding``, ``head``, ``downblocks``, ``middleblocks``, ``upblocks`` and ``tail``. That
network is a ``UNet2DModel`` up to names and three re-parameterisations, so the conversion is exact:

- its time embedding interleaves sin and cos (sin f0, cos f0, sin f1, ...) where diffusers concatenates them
  (all sines, then all cosines, ``flip_sin_to_cos=False``, ``freq_shift=0``): the first Linear's input
  columns are permuted to match;
- its attention projections are 1x1 convolutions, diffusers' are Linear layers: the weights drop the 1x1;
- its blocks are one flat list per direction; diffusers groups them per level (resnets, attentions,
  down/up-samplers), in the same order.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler, UNet2DModel
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clsp.config import Settings, setting
from clsp.errors import UserError
from clsp.io import file_digest, write_json_atomic
from clsp.yamlio import read_yaml

GROUPS = 32  # the authors' GroupNorm(32, C) everywhere
TABLE_KEY = "time_embedding.timembedding.0.weight"
Weights = Literal["ema", "net"]


class AuthorsConfig(BaseModel):
    """The architecture and noise schedule in the authors' diffusion YAML; its other keys (data, training) are
    not the converter's business and are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    T: int = Field(ge=1, le=100_000)
    channel: int = Field(ge=GROUPS)
    channel_mult: list[int] = Field(min_length=1)
    attn: list[int] = []
    num_res_blocks: int = Field(ge=1)
    dropout: float = Field(0.0, ge=0, le=1)
    img_size: int = Field(ge=8, le=1024)
    beta_1: float = Field(gt=0, lt=1)
    beta_T: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _fits_the_architecture(self) -> AuthorsConfig:
        levels = len(self.channel_mult)
        if any(not 0 <= level < levels for level in self.attn):
            raise ValueError(f"attn levels {self.attn} must be indices into channel_mult (0..{levels - 1})")
        if any(m < 1 or self.channel * m % GROUPS for m in self.channel_mult):
            raise ValueError(f"channel x channel_mult must be positive multiples of {GROUPS} (GroupNorm groups)")
        if self.img_size % 2 ** (levels - 1):
            raise ValueError(f"img_size {self.img_size} cannot be halved {levels - 1} times")
        return self


class ConvertJob(Settings):
    """``clsp ddpm convert``: one authors' checkpoint and its YAML into a diffusers model folder."""

    checkpoint: str = setting(..., "The authors' checkpoint (.pt).", cli_exclude=True, min_length=1)
    config: str = setting(..., "The authors' diffusion YAML (configs/diffusion_cifar10.yaml): T, channel, "
                               "channel_mult, attn, num_res_blocks, img_size, beta_1, beta_T.", min_length=1)
    out: str = setting(..., "New model folder (UNet2DModel + DDPMScheduler, flat save_pretrained layout).",
                       min_length=1)
    weights: Weights = setting("ema", "Which weights of a checkpoint holding both ema_model and net_model (a plain "
                                      "state_dict is used as it is).")


def read_config(path: str | Path) -> AuthorsConfig:
    """The authors' YAML, validated; one line naming the bad key otherwise."""
    values = read_yaml(path)  # within the configuration budgets (size, encoding, aliases, depth, duplicates)
    if not isinstance(values, dict):
        raise UserError(f"{path} must be a mapping of the authors' diffusion settings (T, channel, ...)")
    try:
        return AuthorsConfig.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(map(str, first["loc"])) or "config"
        raise UserError(f"{path}: {key}: {first['msg'].removeprefix('Value error, ')}; use the authors' "
                        f"configs/diffusion_*.yaml") from None


def diffusers_config(cfg: AuthorsConfig) -> dict:
    """``UNet2DModel`` keyword arguments of the same network (one attention head per block, as the authors')."""
    levels = range(len(cfg.channel_mult))
    return dict(sample_size=cfg.img_size, in_channels=3, out_channels=3,
                block_out_channels=[cfg.channel * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
                down_block_types=["AttnDownBlock2D" if i in cfg.attn else "DownBlock2D" for i in levels],
                up_block_types=["AttnUpBlock2D" if i in cfg.attn else "UpBlock2D" for i in reversed(levels)],
                attention_head_dim=None, norm_num_groups=GROUPS, norm_eps=1e-5, act_fn="silu", dropout=cfg.dropout,
                flip_sin_to_cos=False, freq_shift=0, time_embedding_type="positional",
                resnet_time_scale_shift="default", downsample_padding=1, add_attention=True)


def sinusoid_table(timesteps: int, dim: int) -> torch.Tensor:
    """The authors' time-embedding table: row t = (sin t f0, cos t f0, sin t f1, ...), f_i = 10000^(-2i/dim)."""
    freqs = torch.exp(-torch.arange(0, dim, 2) / dim * math.log(10000))
    angles = torch.arange(timesteps).float()[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(timesteps, dim)


def _resblock(authors: str, ours: str) -> dict[str, str]:
    return {f"{ours}.norm1": f"{authors}.block1.0", f"{ours}.conv1": f"{authors}.block1.2",
            f"{ours}.time_emb_proj": f"{authors}.temb_proj.1", f"{ours}.norm2": f"{authors}.block2.0",
            f"{ours}.conv2": f"{authors}.block2.3", f"{ours}.conv_shortcut": f"{authors}.shortcut"}


def _attention(authors: str, ours: str) -> dict[str, str]:
    return {f"{ours}.group_norm": f"{authors}.attn.group_norm", f"{ours}.to_q": f"{authors}.attn.proj_q",
            f"{ours}.to_k": f"{authors}.attn.proj_k", f"{ours}.to_v": f"{authors}.attn.proj_v",
            f"{ours}.to_out.0": f"{authors}.attn.proj"}


def module_map(cfg: AuthorsConfig) -> dict[str, str]:
    """diffusers module name -> the authors' module name, walking both block lists in their order."""
    names = {"time_embedding.linear_1": "time_embedding.timembedding.1",
             "time_embedding.linear_2": "time_embedding.timembedding.3", "conv_in": "head",
             "conv_norm_out": "tail.0", "conv_out": "tail.2"}
    last = len(cfg.channel_mult) - 1
    flat = 0
    for level in range(last + 1):
        for j in range(cfg.num_res_blocks):
            names |= _resblock(f"downblocks.{flat}", f"down_blocks.{level}.resnets.{j}")
            if level in cfg.attn:
                names |= _attention(f"downblocks.{flat}", f"down_blocks.{level}.attentions.{j}")
            flat += 1
        if level != last:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"downblocks.{flat}.main"
            flat += 1
    names |= _resblock("middleblocks.0", "mid_block.resnets.0") | _attention("middleblocks.0", "mid_block.attentions.0")
    names |= _resblock("middleblocks.1", "mid_block.resnets.1")
    flat = 0
    for block, level in enumerate(reversed(range(last + 1))):
        for j in range(cfg.num_res_blocks + 1):
            names |= _resblock(f"upblocks.{flat}", f"up_blocks.{block}.resnets.{j}")
            if level in cfg.attn:
                names |= _attention(f"upblocks.{flat}", f"up_blocks.{block}.attentions.{j}")
            flat += 1
        if level != 0:
            names[f"up_blocks.{block}.upsamplers.0.conv"] = f"upblocks.{flat}.main"
            flat += 1
    return names


def load_checkpoint(path: str | Path, weights: Weights = "ema") -> dict[str, torch.Tensor]:
    """The U-Net's tensors: a plain ``state_dict`` (what the authors' training script saves, EMA or not), or
    ``weights`` of a training checkpoint holding ``ema_model`` and ``net_model``; a ``module.`` prefix
    (DataParallel) is dropped."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"cannot read {path} as a PyTorch checkpoint of tensors: "
                        f"{' '.join(str(err).split())[:200]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict of the authors' U-Net")
    wrapped = {key: state[key] for key in ("ema_model", "net_model") if isinstance(state.get(key), dict)}
    if wrapped:
        key = f"{weights}_model"
        if key not in wrapped:
            raise UserError(f"{path} has no {key}; pass --weights {next(iter(wrapped)).removesuffix('_model')}")
        state = wrapped[key]
    tensors = {name: value for name, value in state.items() if torch.is_tensor(value)}
    if tensors and all(name.startswith("module.") for name in tensors):
        tensors = {name.removeprefix("module."): value for name, value in tensors.items()}
    return tensors


def _authors_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The authors' shape of a diffusers tensor: attention projections are 1x1 convolutions there."""
    module = name.rsplit(".", 1)[0]
    is_projection = module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or module.endswith("to_out.0")
    return (*shape, 1, 1) if is_projection and name.endswith(".weight") else shape


def _interleaved_columns(dim: int) -> torch.Tensor:
    """Column order taking the authors' interleaved (sin, cos) input to diffusers' (all sin, all cos)."""
    half = dim // 2
    return torch.cat([torch.arange(half) * 2, torch.arange(half) * 2 + 1])


def convert_state(state: dict[str, torch.Tensor], cfg: AuthorsConfig, unet: UNet2DModel,
                  source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The diffusers ``state_dict`` for ``unet`` from the authors' tensors; refuses missing or misshapen
    tensors, naming the first ones."""
    names = module_map(cfg)
    problems: list[str] = []
    converted: dict[str, torch.Tensor] = {}
    targets = unet.state_dict()
    expected: list[tuple[str, tuple[int, ...], str | None]] = [(TABLE_KEY, (cfg.T, cfg.channel), None)]
    for name, target in targets.items():
        module, param = name.rsplit(".", 1)
        expected.append((f"{names[module]}.{param}", _authors_shape(name, tuple(target.shape)), name))
    for key, shape, ours in expected:
        if key not in state:
            problems.append(f"{key} missing")
        elif tuple(state[key].shape) != shape:
            problems.append(f"{key} is {list(state[key].shape)}, the config needs {list(shape)}")
        elif ours is not None:
            converted[ours] = state[key].float().reshape(targets[ours].shape)
    if problems:
        raise UserError(f"{source} does not fit the config ({len(problems)} tensors): {'; '.join(problems[:3])}"
                        f"{' ...' if len(problems) > 3 else ''}; pass the YAML the checkpoint was trained with")
    if not torch.allclose(state[TABLE_KEY].float(), sinusoid_table(cfg.T, cfg.channel), atol=1e-4):
        raise UserError(f"{source}'s time-embedding table is not the interleaved DDPM sinusoid of T={cfg.T}; "
                        f"it is not a checkpoint of the authors' U-Net")
    linear_1 = "time_embedding.linear_1.weight"
    converted[linear_1] = converted[linear_1][:, _interleaved_columns(cfg.channel)]
    return converted


def convert(job: ConvertJob) -> Path:
    """Write ``job.out``: the converted U-Net (safetensors), its DDPMScheduler and ``conversion.json``, all
    appearing at once (a temporary folder renamed into place)."""
    out = Path(job.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new --out folder or remove it")
    cfg = read_config(job.config)
    state = load_checkpoint(job.checkpoint, job.weights)
    unet = UNet2DModel(**diffusers_config(cfg))
    unet.load_state_dict(convert_state(state, cfg, unet, source=str(job.checkpoint)), strict=True)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.T, beta_start=cfg.beta_1, beta_end=cfg.beta_T,
                              beta_schedule="linear", prediction_type="epsilon")
    size, sha256 = file_digest(job.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"  # mkdir, unlike mkdtemp, keeps the umask's mode
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        unet.save_pretrained(staging, safe_serialization=True)
        scheduler.save_pretrained(staging)
        write_json_atomic(staging / "conversion.json", {
            "source": Path(job.checkpoint).name, "bytes": size, "sha256": sha256, "weights": job.weights,
            "authors_config": cfg.model_dump()})
        staging.replace(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

