"""Why MoCo sits near collapse on the digits default: the per-epoch spread and cosines of its baseline runs.

Train one baseline per setting (each in its own run directory, sharing one shard set), e.g.

    clsp run pipeline.yaml --set train.method=moco --set run_dir=runs/diag/default --only generate
    clsp run pipeline.yaml --set train.method=moco --set run_dir=runs/diag/default --only train:baseline
    (again with --set train.lr=0.1, train.queue_size=256, train.temperature=0.1, train.momentum=0.9 ...)

then ``python benchmarks/moco_diagnosis.py runs/diag`` prints the table and writes JSON and Markdown. It reads
``train_summary.json`` only: training-split curves, no evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from clsp.io import write_bytes_atomic

COLUMNS = ("z_std", "key_std", "key_cos", "queue_cos", "probe_acc", "loss_base")
EPOCHS = (1, 3, 5, 8, 15)


def curves(run: Path) -> dict:
    """One run's per-epoch MoCo metrics (``z_std`` and ``key_std`` scaled by sqrt(d): about 1 spread, 0 collapsed)."""
    summary = json.loads((run / "train" / "baseline" / "train_summary.json").read_text())
    per_epoch = summary["per_epoch"]
    scale = math.sqrt(summary["settings"]["proj_output_dim"])
    rows = [{key: epoch.get(key, math.nan) * (scale if key.endswith("std") else 1.0) for key in COLUMNS}
            for epoch in per_epoch]
    return {"run": run.name, "collapsed": summary["collapse"]["collapsed"], "per_epoch": rows}


@click.command()
@click.argument("runs", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/moco_digits_diagnosis.json"),
              show_default=True)
def main(runs: Path, out: Path) -> None:
    found = [curves(run) for run in sorted(runs.iterdir()) if (run / "train/baseline/train_summary.json").is_file()]
    if not found:
        raise click.ClickException(f"{runs} holds no run with train/baseline/train_summary.json; train them first")
    lines = ["| setting | epoch | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for entry in found:
        for epoch in EPOCHS:
            if epoch <= len(entry["per_epoch"]):
                row = entry["per_epoch"][epoch - 1]
                name = entry["run"] + (" (collapsed)" if entry["collapsed"] else "") if epoch == EPOCHS[0] else ""
                lines.append(f"| {name} | {epoch} | " + " | ".join(f"{row[key]:.3f}" for key in COLUMNS) + " |")
    table = "\n".join(lines)
    click.echo(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, json.dumps(found, indent=1).encode())
    markdown = f"# MoCo baseline on the digits default, per epoch\n\n{table}\n"
    write_bytes_atomic(out.with_suffix(".md"), markdown.encode())


if __name__ == "__main__":
    main()
