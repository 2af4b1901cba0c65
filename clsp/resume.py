"""What every resumable run shares (the DDPM trainer and the contrastive trainer).

A checkpoint holds the run's resolved settings; a rerun resumes it only when every setting that shapes
the result matches, so a changed learning rate or index is refused instead of silently mixed in. RNG
states travel with the checkpoint, and a digest of the weights per rank shows a desynchronised replica.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsp.errors import UserError
from clsp.io import load_torch, save_torch_atomic

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """torch, numpy and CUDA generator states as tensors and plain values (``weights_only`` loadable)."""
    legacy = np.random.get_state()
    if not isinstance(legacy, tuple):
        raise TypeError("numpy's global generator is not the default MT19937; its state cannot be recorded")
    keys, pos = legacy[1:3]
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos)}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def weights_digest(module: torch.nn.Module) -> str:
    """A short sha256 of the parameters, to compare replicas across ranks."""
    digest = hashlib.sha256()
    for param in module.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_checkpoint(path: Path, settings: dict[str, Any], start_over: bool = False) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one; refused in one line when damaged or of other settings.

    ``start_over``: one of other settings is passed over instead (the new run's first save replaces it), for a
    directory that belongs to one configuration, as ``clsp run``'s run directory does."""
    if not path.is_file():
        return None
    try:
        state = load_torch(path)
    except Exception as error:  # a truncated or foreign file: torch raises many types
        raise UserError(f"checkpoint {path} cannot be read ({type(error).__name__}); delete it to start the run "
                        "over, or pass another --out") from None
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise UserError(f"checkpoint {path} records no settings (made by another version?); delete it to start "
                        "over, or pass another --out")
    diffs = [f"{key}: {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
             if saved.get(key) != value]
    if diffs and start_over:
        log.info(f"{path} is from a run with other settings ({'; '.join(diffs[:3])}); starting over")
        return None
    if diffs:
        raise UserError(f"checkpoint {path} is from a run with other settings ({'; '.join(diffs[:3])}); rerun "
                        "with those settings to resume it, or pass another --out")
    return state


def save_checkpoint(path: Path, state: dict[str, Any], settings: dict[str, Any]) -> None:
    """Write ``state`` plus the run's settings and RNG states atomically."""
    save_torch_atomic(path, {**state, "settings": settings, "rng": rng_state()})
