"""Process-level runtime shared by every stage: the Accelerator, precision, progress bars."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from clsp.config import PRECISIONS, TF32

T = TypeVar("T")


def make_accelerator(precision: str = "fp32", **kwargs) -> Accelerator:
    """Build the Accelerator every command uses.

    ``cpu=True`` on machines without CUDA makes ``accelerate launch --multi_gpu`` form a real gloo
    process group on CPUs instead of N independent rank-0 processes. Stages run one after another in
    one process (``clsp run``) may want different precisions: the previous stage's mixed-precision state
    is dropped first, while the process group (accelerate's partial state) is kept.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    mixed = "bf16" if resolve_precision(precision) == "bf16" else "no"
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed, **kwargs)


def apply_tf32(mode: TF32) -> None:
    """Set this process's TF32 switches to a stage's ``tf32`` setting (``clsp.config.NumericsSettings``), so the
    fp32 a run means is the one it records rather than whatever PyTorch's defaults are where it runs."""
    torch.backends.cudnn.allow_tf32 = mode in ("conv", "all")
    torch.backends.cuda.matmul.allow_tf32 = mode == "all"


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device | None = None) -> str:
    """Map ``auto`` to ``bf16`` on CUDA and on CPUs with bf16 units, else ``fp32``."""
    if precision not in PRECISIONS:
        from clsp.errors import UserError

        raise UserError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "bf16" if on_cuda or cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on the given device when asked for, else a no-op."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             main_process: bool = True, unit: str = "it") -> tqdm:
    """A tqdm bar shown once per process group and only on a terminal."""
    disable = not main_process or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, unit=unit, dynamic_ncols=True)
