"""What a finished training run reports besides its encoder: the one line it prints and ``loss_curve.png``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def summary_line(summary: dict, out: Path) -> str:
    """The line a run prints at its end: the final losses and accuracies, and where its encoder is."""
    final = summary["final"]
    name = summary["method"] + (f"+CLSP(lambda={summary['clsp_lambda']:g})" if summary["clsp_lambda"] else "")
    parts = [f"loss {final.get('loss', float('nan')):.4f} (base {final.get('loss_base', float('nan')):.4f}, "
             f"clsp {final.get('loss_clsp', float('nan')):.4f})"]
    for key, label in (("probe_acc", "online probe"), ("nn_acc", "nn acc")):
        if key in final:
            parts.append(f"{label} {100 * final[key]:.1f}%")
    sync = "" if summary["ranks_in_sync"] else " WARNING: ranks ended with different weights"
    return (f"trained {name} {summary['backbone']} on {summary['dataset']['name']}/{summary['dataset']['split']}: "
            f"{summary['epochs']} epochs, {summary['steps']} steps x {summary['world_size']} process(es), "
            f"{', '.join(parts)}, {summary['time_s']:.1f} s -> {out / 'encoder.safetensors'}{sync}")


def plot_losses(history: list[list[float]], path: Path, steps_per_epoch: int) -> None:
    """Loss terms against training step, with epochs on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(history, dtype=np.float64).reshape(-1, 4)
    fig, ax = plt.subplots(figsize=(7, 4))
    window = max(1, min(50, len(data) // 20))
    kernel = np.ones(window) / window
    for column, label in ((1, "total"), (2, "base"), (3, "CLSP term")):
        if len(data) >= window:
            ax.plot(data[window - 1:, 0], np.convolve(data[:, column], kernel, mode="valid"), label=label)
    ax.set_xlabel(f"step ({steps_per_epoch} per epoch)")
    ax.set_ylabel("loss" + (f" (moving mean of {window})" if window > 1 else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from clsp.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
