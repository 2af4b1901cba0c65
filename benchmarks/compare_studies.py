"""Paired differences between arms of different `clsp study` runs that share their seeds.

A study pairs CLSP with its own baseline; some questions cross studies: what labels buy (SupCon against SimCLR,
conditional against unconditional positives). Runs of the same seed start from the same weights and see the
same epoch order when their methods build the same networks, so such arms pair per seed too. For example

    python benchmarks/compare_studies.py --against simclr \\
        --arm simclr=runs/simclr/study/study.json:simclr:baseline \\
        --arm supcon=runs/supcon/study/study.json:supcon:baseline

prints each arm's mean over the seeds all arms share and its paired difference from ``--against``, per metric,
and writes them as JSON (``--out``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from clsp.io import write_bytes_atomic
from clsp.study.stats import interval

METRICS = ("linear top-1", "deterministic probe top-1", "kNN top-1")


def arm_scores(spec: str) -> tuple[str, dict[str, dict[int, float]]]:
    """``LABEL=STUDY_JSON:METHOD:ARM`` -> the label and, per metric, that arm's score of each seed."""
    label, _, rest = spec.partition("=")
    path, method, arm = rest.rsplit(":", 2)
    study = json.loads(Path(path).read_text())
    summary = study["summary"][method]
    return label, {metric: dict(zip(study["seeds"], summary[metric]["per_seed"][arm], strict=True))
                   for metric in METRICS if metric in summary}


def compare(arms: dict[str, dict[str, dict[int, float]]], against: str) -> dict[str, Any]:
    """Each arm's interval over the shared seeds, and its per-seed difference from ``against``."""
    seeds = sorted(set.intersection(*(set(per_seed) for scores in arms.values() for per_seed in scores.values())))
    out: dict[str, Any] = {"seeds": seeds, "against": against, "metrics": {}}
    for metric in METRICS:
        if not all(metric in scores for scores in arms.values()):
            continue
        ref = [arms[against][metric][s] for s in seeds]
        out["metrics"][metric] = {
            label: {"arm": interval([scores[metric][s] for s in seeds]),
                    "difference": interval([scores[metric][s] - r for s, r in zip(seeds, ref, strict=True)])}
            for label, scores in arms.items()}
    return out


@click.command()
@click.option("--arm", "specs", multiple=True, required=True, help="LABEL=STUDY_JSON:METHOD:ARM (repeatable).")
@click.option("--against", required=True, help="The label the others are compared with.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON report.")
def main(specs: tuple[str, ...], against: str, out: Path) -> None:
    arms = dict(arm_scores(spec) for spec in specs)
    if against not in arms:
        raise click.BadParameter(f"{against!r} is not one of the arms ({', '.join(arms)})", param_hint="--against")
    result = compare(arms, against)
    click.echo(f"seeds {result['seeds']}; differences paired per seed against {against}")
    click.echo("| metric | arm | mean [95 % CI] | minus " + against + " [95 % CI] |\n|---|---|---:|---:|")
    for metric, rows in result["metrics"].items():
        for label, row in rows.items():
            a, d = row["arm"], row["difference"]
            click.echo(f"| {metric} | {label} | {a['mean']:.2f} ± {a['half_width']:.2f} | "
                       + ("-" if label == against else f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]") + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
