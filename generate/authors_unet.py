"""Convert a DDPM checkpoint of the authors' U-Net into a diffusers ``UNet2DModel`` folder that ``clsp-gen --unet``
loads.

The paper's positives come from the authors' own DDPM U-Nets (METHOD.md section 3): Ho et al.'s architecture,
``UNet(T, ch, ch_mult, attn, num_res_blocks, dropout)``, as re-implemented in PyTorch. Two published layouts of
that network's ``state_dict`` are read:

- ``split``: the CLSP authors' ``models/unet.py``, split into an encoder and a decoder so that bottlenecks can be
  mixed; their ``train_diffusion.py`` saves one plain ``state_dict`` per file (training and EMA weights) with every
  tensor under ``time_embedding.``, ``encoder.`` (``head``, ``downblocks``, ``middleblocks``) or ``decoder.``
  (``upblocks``, ``tail``). ``encoder.projector.*``, an MLP head on the pooled bottleneck, takes no part in a
  noise prediction: it is ignored, and ``conversion.json`` says so.
- ``flat``: the same modules at the top level (``head``, ``downblocks``, ...), as pytorch-ddpm saves them; its
  released CIFAR-10 ``ckpt.pt`` holds both ``net_model`` and ``ema_model`` (``--weights`` picks one).

The network is a ``UNet2DModel`` up to names and two re-parameterisations, so the conversion is exact:

- its time embedding interleaves sin and cos (sin f0, cos f0, sin f1, ...) where diffusers concatenates them
  (all sines, then all cosines, ``flip_sin_to_cos=False``, ``freq_shift=0``): the first Linear's input
  columns are permuted to match;
- its attention projections are 1x1 convolutions, diffusers' are Linear layers: the weights drop the 1x1.

Everything is checked before anything is built: the YAML's sizes (and the parameter count they imply), then
every tensor's name, shape, dtype and values; floating tensors of another precision are cast to float32 and
named in ``conversion.json``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from clsp.config import Settings, setting
from clsp.errors import UserError
from clsp.io import file_digest, read_checkpoint, regular_file, staged_directory, write_json_atomic
from clsp.yamlio import read_yaml

GROUPS = 32  # the authors' GroupNorm(32, C) everywhere
TABLE_KEY = "time_embedding.timembedding.0.weight"
MAX_PARAMETERS = 500_000_000  # 2 GB of float32: 14 times the authors' CIFAR-10 U-Net (35.7 M)
PROJECTOR = "encoder.projector."
PROJECTOR_TENSORS = frozenset(f"{PROJECTOR}{name}" for name in (
    "0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    "3.weight", "3.bias"))
Weights = Literal["ema", "net"]
Layout = Literal["split", "flat"]
_ENCODER_PARTS = ("head", "downblocks", "middleblocks")  # the split layout's encoder; the rest is its decoder


class AuthorsConfig(Settings):
    """The architecture and noise schedule in the authors' diffusion YAML, within bounds checked before anything
    is built; its other keys (data, training) are not the converter's business and are ignored."""

    model_config = ConfigDict(extra="ignore")

    T: int = Field(ge=1, le=10_000)
    channel: int = Field(ge=GROUPS, le=1024)
    channel_mult: list[int] = Field(min_length=1, max_length=8)
    attn: list[int] = Field([], max_length=8)
    num_res_blocks: int = Field(ge=1, le=16)
    dropout: float = Field(0.0, ge=0, le=1)
    img_size: int = Field(ge=8, le=1024)
    beta_1: float = Field(gt=0, lt=1)
    beta_T: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _fits_the_architecture(self) -> AuthorsConfig:
        levels = len(self.channel_mult)
        if any(not 1 <= m <= 16 for m in self.channel_mult):
            raise ValueError(f"channel_mult {self.channel_mult} must hold multipliers from 1 to 16")
        if any(not 0 <= level < levels for level in self.attn):
            raise ValueError(f"attn levels {self.attn} must be indices into channel_mult (0..{levels - 1})")
        if any(self.channel * m % GROUPS for m in self.channel_mult):
            raise ValueError(f"channel x channel_mult must be multiples of {GROUPS} (GroupNorm groups)")
        if self.img_size % 2 ** (levels - 1):
            raise ValueError(f"img_size {self.img_size} cannot be halved {levels - 1} times")
        if self.beta_1 >= self.beta_T:
            raise ValueError(f"beta_1 {self.beta_1:g} must be below beta_T {self.beta_T:g} (a rising linear schedule)")
        count = sum(math.prod(shape) for _, _, shapes, _ in _modules(self) for shape in shapes.values())
        if count > MAX_PARAMETERS:
            raise ValueError(f"channel {self.channel} x channel_mult {self.channel_mult} x num_res_blocks "
                             f"{self.num_res_blocks} make {count:,} parameters, over the {MAX_PARAMETERS:,} limit")
        return self


class ConvertJob(Settings):
    """``clsp ddpm convert``: one authors' checkpoint and its YAML into a diffusers model folder."""

    checkpoint: str = setting(..., "The authors' checkpoint (.pt).", cli_exclude=True, min_length=1)
    config: str = setting(..., "The authors' diffusion YAML (configs/diffusion_cifar10.yaml): T, channel, "
                               "channel_mult, attn, num_res_blocks, img_size, beta_1, beta_T.", min_length=1)
    out: str = setting(..., "New model folder (UNet2DModel + DDPMScheduler, flat save_pretrained layout).",
                       min_length=1)
    weights: Weights = setting("ema", "Which weights of a checkpoint holding both ema_model and net_model "
                                      "(pytorch-ddpm's); a plain state_dict, as the authors save, is used as it is.")


def read_config(path: str | Path) -> AuthorsConfig:
    """The authors' YAML, validated; one line naming the bad key otherwise."""
    values = read_yaml(regular_file(path, "--config"))  # within the configuration budgets
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


# A module of the authors' network: (its name in the flat layout, its diffusers name, parameter -> the authors'
# shape, whether diffusers holds its weight without the trailing 1x1 of a pointwise convolution).
Module = tuple[str, str, dict[str, tuple[int, ...]], bool]


def _norm(ch: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (ch,), "bias": (ch,)}


def _layer(cout: int, cin: int, *kernel: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (cout, cin, *kernel), "bias": (cout,)}


def _resblock(authors: str, ours: str, cin: int, cout: int, tdim: int) -> Iterator[Module]:
    yield f"{authors}.block1.0", f"{ours}.norm1", _norm(cin), False
    yield f"{authors}.block1.2", f"{ours}.conv1", _layer(cout, cin, 3, 3), False
    yield f"{authors}.temb_proj.1", f"{ours}.time_emb_proj", _layer(cout, tdim), False
    yield f"{authors}.block2.0", f"{ours}.norm2", _norm(cout), False
    yield f"{authors}.block2.3", f"{ours}.conv2", _layer(cout, cout, 3, 3), False
    if cin != cout:
        yield f"{authors}.shortcut", f"{ours}.conv_shortcut", _layer(cout, cin, 1, 1), False


def _attention(authors: str, ours: str, ch: int) -> Iterator[Module]:
    yield f"{authors}.attn.group_norm", f"{ours}.group_norm", _norm(ch), False
    for theirs, diffusers in (("proj_q", "to_q"), ("proj_k", "to_k"), ("proj_v", "to_v"), ("proj", "to_out.0")):
        yield f"{authors}.attn.{theirs}", f"{ours}.{diffusers}", _layer(ch, ch, 1, 1), True


def _modules(cfg: AuthorsConfig) -> Iterator[Module]:
    """Every module of the noise prediction, in the order the authors' network builds them (which fixes the flat
    block indices): no tensor is allocated, so this also sizes a network before it is built."""
    ch, tdim, last = cfg.channel, 4 * cfg.channel, len(cfg.channel_mult) - 1
    yield "time_embedding.timembedding.1", "time_embedding.linear_1", _layer(tdim, ch), False
    yield "time_embedding.timembedding.3", "time_embedding.linear_2", _layer(tdim, tdim), False
    yield "head", "conv_in", _layer(ch, 3, 3, 3), False
    skips, now, flat = [ch], ch, 0
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(cfg.num_res_blocks):
            yield from _resblock(f"downblocks.{flat}", f"down_blocks.{level}.resnets.{j}", now, ch * mult, tdim)
            now = ch * mult
            if level in cfg.attn:
                yield from _attention(f"downblocks.{flat}", f"down_blocks.{level}.attentions.{j}", now)
            skips.append(now)
            flat += 1
        if level != last:
            yield f"downblocks.{flat}.main", f"down_blocks.{level}.downsamplers.0.conv", _layer(now, now, 3, 3), False
            skips.append(now)
            flat += 1
    yield from _resblock("middleblocks.0", "mid_block.resnets.0", now, now, tdim)
    yield from _attention("middleblocks.0", "mid_block.attentions.0", now)
    yield from _resblock("middleblocks.1", "mid_block.resnets.1", now, now, tdim)
    flat = 0
    for block, level in enumerate(reversed(range(last + 1))):
        for j in range(cfg.num_res_blocks + 1):
            cout = ch * cfg.channel_mult[level]
            yield from _resblock(f"upblocks.{flat}", f"up_blocks.{block}.resnets.{j}", skips.pop() + now, cout, tdim)
            now = cout
            if level in cfg.attn:
                yield from _attention(f"upblocks.{flat}", f"up_blocks.{block}.attentions.{j}", now)
            flat += 1
        if level != 0:
            yield f"upblocks.{flat}.main", f"up_blocks.{block}.upsamplers.0.conv", _layer(now, now, 3, 3), False
            flat += 1
    yield "tail.0", "conv_norm_out", _norm(now), False
    yield "tail.2", "conv_out", _layer(3, now, 3, 3), False


def _named(module: str, layout: Layout) -> str:
    """A module's name in ``layout``: the split layout puts it under ``encoder.`` or ``decoder.``."""
    top = module.split(".", 1)[0]
    if layout == "flat" or top == "time_embedding":
        return module
    return f"{'encoder' if top in _ENCODER_PARTS else 'decoder'}.{module}"


def authors_tensors(cfg: AuthorsConfig, layout: Layout = "split") -> dict[str, tuple[int, ...]]:
    """Every tensor a noise prediction reads, by its name in ``layout``, with its shape (the projector of the
    split layout, which none reads, is not among them)."""
    tensors: dict[str, tuple[int, ...]] = {TABLE_KEY: (cfg.T, cfg.channel)}
    for module, _, shapes, _ in _modules(cfg):
        tensors |= {f"{_named(module, layout)}.{param}": shape for param, shape in shapes.items()}
    return tensors


def _read_checkpoint(path: Path, weights: Weights) -> tuple[dict, str]:
    """The checkpoint's ``state_dict`` and which one it is (``state_dict``, ``ema_model`` or ``net_model``)."""
    state = read_checkpoint(path, "pass the .pt file the authors' training script saved")
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state_dict of the authors' U-Net")
    wrapped = [key for key in ("ema_model", "net_model") if isinstance(state.get(key), dict)]
    if not wrapped:
        return state, "state_dict"
    key = f"{weights}_model"
    if key not in wrapped:
        raise UserError(f"{path} has no {key}; pass --weights {wrapped[0].removesuffix('_model')}")
    return state[key], key


def load_checkpoint(path: str | Path, cfg: AuthorsConfig, weights: Weights = "ema") -> tuple[dict[str, torch.Tensor],
                                                                                             dict]:
    """The noise prediction's tensors (float32, by the flat layout's names) and what the conversion records:
    the layout, the tensors ignored and those cast. Refuses, in one line naming them, tensors that are missing,
    unexpected, misshapen, not floating point or not finite; a ``module.`` prefix (DataParallel) is dropped."""
    path = Path(path).expanduser()
    state, which = _read_checkpoint(path, weights)
    names = [name for name in state if not isinstance(name, str)]
    if names:
        raise UserError(f"{path} has a key {str(names[0])[:40]!r} of type {type(names[0]).__name__}, not a tensor "
                        f"name: it is not a state_dict of the authors' U-Net")
    if state and all(name.startswith("module.") for name in state):
        state = {name.removeprefix("module."): value for name, value in state.items()}
    layout: Layout = "split" if any(name.startswith(("encoder.", "decoder.")) for name in state) else "flat"
    expected = authors_tensors(cfg, layout)
    ignored = sorted(PROJECTOR_TENSORS & state.keys()) if layout == "split" else []
    problems = [f"{name[:80]} missing" for name in expected if name not in state]
    problems += [f"{name[:80]} unexpected" for name in state if name not in expected and name not in ignored]
    problems += [f"{name} is {list(state[name].shape)}, the config needs {list(shape)}"
                 for name, shape in expected.items() if torch.is_tensor(state.get(name))
                 and tuple(state[name].shape) != shape]
    problems += [f"{name} is a {type(state[name]).__name__}, not a tensor" for name in expected
                 if name in state and not torch.is_tensor(state[name])]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path} does not fit the config ({len(problems)} tensors): {'; '.join(problems[:3])}{more}; "
                        f"pass the YAML the checkpoint was trained with")
    cast: dict[str, list[str]] = {}
    tensors = {}
    for name in expected:
        tensor = state[name]
        if not tensor.is_floating_point():
            raise UserError(f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, not floating "
                            f"point; the authors' weights are float32 (a quantised or altered file is not converted)")
        if not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{path}: tensor {name} holds NaN or infinite values (a diverged run or an altered "
                            f"file); use another checkpoint")
        if tensor.dtype != torch.float32:
            cast.setdefault(str(tensor.dtype).removeprefix("torch."), []).append(name)
        tensors[name.removeprefix("encoder.").removeprefix("decoder.")] = tensor.float()
    record = {"checkpoint": which, "layout": layout, "cast_to_float32": cast,
              "ignored": {"tensors": ignored, "why": "the encoder's projector head takes no part in a noise "
                                                    "prediction"} if ignored else {}}
    return tensors, record


def convert_state(tensors: dict[str, torch.Tensor], cfg: AuthorsConfig, source: str | Path = "the checkpoint"
                  ) -> dict[str, torch.Tensor]:
    """The diffusers ``state_dict`` of the same network from the authors' tensors (flat names, checked by
    ``load_checkpoint``); refuses a time-embedding table that is not the authors' sinusoid."""
    # diffusers computes the table itself: this only recognises the authors' (an fp16 copy is 5e-4 off at most)
    if not torch.allclose(tensors[TABLE_KEY], sinusoid_table(cfg.T, cfg.channel), atol=1e-2):
        raise UserError(f"{source}'s time-embedding table is not the interleaved DDPM sinusoid of T={cfg.T}; "
                        f"it is not a checkpoint of the authors' U-Net")
    converted = {}
    for module, ours, shapes, pointwise in _modules(cfg):
        for param in shapes:
            tensor = tensors[f"{module}.{param}"]
            converted[f"{ours}.{param}"] = tensor[:, :, 0, 0] if pointwise and param == "weight" else tensor
    half = cfg.channel // 2  # the authors' (sin, cos) pairs to diffusers' (all sin, all cos)
    columns = torch.cat([torch.arange(half) * 2, torch.arange(half) * 2 + 1])
    converted["time_embedding.linear_1.weight"] = converted["time_embedding.linear_1.weight"][:, columns]
    return converted


def convert(job: ConvertJob) -> Path:
    """Write ``job.out``: the converted U-Net (safetensors), its DDPMScheduler and ``conversion.json``, all
    appearing at once (a staged folder renamed into place; one a killed run left is removed first)."""
    from diffusers import DDPMScheduler, UNet2DModel

    out = Path(job.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists; choose a new --out folder or remove it")
    cfg = read_config(job.config)
    tensors, record = load_checkpoint(job.checkpoint, cfg, job.weights)
    converted = convert_state(tensors, cfg, job.checkpoint)
    unet = UNet2DModel(**diffusers_config(cfg))
    unet.load_state_dict(converted, strict=True)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.T, beta_start=cfg.beta_1, beta_end=cfg.beta_T,
                              beta_schedule="linear", prediction_type="epsilon")
    size, sha256 = file_digest(Path(job.checkpoint).expanduser())
    with staged_directory(out) as staging:
        unet.save_pretrained(staging, safe_serialization=True)
        scheduler.save_pretrained(staging)
        write_json_atomic(staging / "conversion.json", {
            "source": Path(job.checkpoint).name, "bytes": size, "sha256": sha256, **record,
            "authors_config": cfg.model_dump()})
    return out
