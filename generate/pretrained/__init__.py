"""Diffusion models shipped with the package, one folder each (``digits-ddpm``, ``digits-ddpm-cond``)."""

from __future__ import annotations

from pathlib import Path


def shipped_model(name: str) -> Path | None:
    """The folder of the model shipped as ``name``, or None where none is (``name`` is then a hub id)."""
    folder = Path(__file__).parent / name
    return folder if "/" not in name and folder.is_dir() else None
