"""Do the synthetic positives keep their anchor's class, and how diverse are they?

Draws positives for real digits anchors with the interpolated sampler at several interpolation weights w
and mix depths (0 = bottleneck only, METHOD.md; d = also the d deepest skips) and asks a classifier trained
on the real digits which class each positive shows. At w = 1 the anchor is ignored (plain unconditional
sampling), so agreement sits near chance. Beside class-keeping it reports diversity: mean L2 distance of a
positive to its anchor (over all positives and over those that keep the class) and between two candidates
of one anchor, in the model's [-1, 1] pixel range. Then, for each m, what choosing among the top m
candidates would keep: ranked by their bottleneck agreement (``clsp.generate.scoring``) at each scoring
timestep, and, as the reference a score must beat, by plain pixel closeness to the anchor; AUC is the
ranking's ROC AUC for "keeps the class". A class-conditional model (``clsp ddpm train --conditional``) draws
each anchor's positives for its label at each classifier-free guidance weight of ``--guidance``; w = 1 is then
the authors' conditional mode (no interpolation).

    python benchmarks/positives_class_keeping.py [--unet FOLDER] [--anchors 100] [--w 0.1,1.0] \
        [--mix-depths 0,1,2,4] [--top-m 2,4] [--score-timesteps 100] [--guidance 0,1.8]

Prints a table and writes benchmarks/results/positives_class_keeping.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench_generate import mean_pairwise_l2
from clsp.datasets import get_dataset
from clsp.errors import Command
from clsp.generate import sample_positives
from clsp.generate.scoring import bottleneck_agreement
from clsp.generate.unet import load_unet, resolve_unet
from clsp.io import write_json_atomic
from digits_reference import fit_reference_classifier, grey

RESULTS = Path(__file__).parent / "results" / "positives_class_keeping.json"


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _top_m(name: str, ranking: np.ndarray, kept: np.ndarray, distance: np.ndarray, images: torch.Tensor,
           m: int) -> dict:
    """What choosing uniformly among the m best candidates by ``ranking`` (higher first) would give."""
    best = np.argsort(-ranking, axis=1, kind="stable")[:, :m]
    chosen = images[torch.arange(len(best))[:, None], torch.from_numpy(best)]
    return {"choice": name, "m": m, "class_kept": float(np.take_along_axis(kept, best, 1).mean()),
            "l2_to_anchor": float(np.take_along_axis(distance, best, 1).mean()),
            "pairwise_l2": mean_pairwise_l2(chosen) if m > 1 else None,
            "auc": float(roc_auc_score(kept.ravel(), ranking.ravel())) if 0 < kept.mean() < 1 else None}


def _guidance(row: dict) -> str:
    return f"{row['guidance']:>6.1f}" if row.get("guidance") is not None else f"{'-':>6}"


def _print(rows: list[dict]) -> None:
    click.echo(f"{'w':>5}{'depth':>6}{'guide':>6}{'kept':>7}{'all kept':>9}{'L2 anchor':>10}{'of kept':>8}"
               f"{'L2 pairs':>9}{'s':>6}")
    for row in rows:
        click.echo(f"{row['w']:>5.2f}{row['mix_depth']:>6}{_guidance(row)}{row['class_kept']:>7.3f}"
                   f"{row['anchors_with_all_candidates_kept']:>9.3f}{row['l2_to_anchor']:>10.2f}"
                   f"{row['l2_to_anchor_of_kept']:>8.2f}{row['pairwise_l2']:>9.2f}{row['seconds']:>6.0f}")
    click.echo(f"\n{'w':>5}{'depth':>6}{'guide':>6}  {'choice':<26}{'kept':>7}{'L2 anchor':>10}{'L2 pairs':>9}"
               f"{'AUC':>6}")
    for row in rows:
        for c in row["choices"]:
            pairs = f"{c['pairwise_l2']:>9.2f}" if c["pairwise_l2"] is not None else f"{'-':>9}"
            auc = f"{c['auc']:>6.2f}" if c["auc"] is not None else f"{'-':>6}"
            click.echo(f"{row['w']:>5.2f}{row['mix_depth']:>6}{_guidance(row)}  {c['choice']:<26}"
                       f"{c['class_kept']:>7.3f}{c['l2_to_anchor']:>10.2f}{pairs}{auc}")


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--unet", default=None, help="Model folder [default: the shipped digits model; with --guidance its "
              "class-conditional one].")
@click.option("--anchors", "num_anchors", type=int, default=100, help="Test-split anchors.")
@click.option("--candidates", type=int, default=8)
@click.option("--steps", type=int, default=20)
@click.option("--eta", type=float, default=0.1)
@click.option("--w", "ws", default="0.1,1.0", help="Comma-separated interpolation weights w.")
@click.option("--mix-depths", default="0", help="Comma-separated mix depths (0 = bottleneck only).")
@click.option("--top-m", "top_ms", default="2", help="Comma-separated m of the top-m choices.")
@click.option("--score-timesteps", default="100", help="Comma-separated timesteps for the candidate scores.")
@click.option("--guidance", "guidances", default="",
              help="Comma-separated guidance weights (a class-conditional model only; empty: unconditional).")
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS))
def main(unet: str | None, num_anchors: int, candidates: int, steps: int, eta: float, ws: str, mix_depths: str,
         top_ms: str, score_timesteps: str, guidances: str, seed: int, out: str) -> None:
    classifier, _ = fit_reference_classifier()
    test = get_dataset("digits", "test")
    index = np.arange(min(num_anchors, len(test)))
    labels = test.labels()[index]
    anchors = torch.from_numpy(test.array(index)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    model, scheduler = load_unet(resolve_unet(unet, "digits", conditional=bool(guidances)))
    rows = []
    grid = [(w, depth, guidance) for w in _floats(ws) for depth in _ints(mix_depths)
            for guidance in (_floats(guidances) if guidances else [None])]
    for w, depth, guidance in grid:
        started = time.time()
        generators = [torch.Generator().manual_seed(seed * 100_003 + int(i)) for i in index]
        images = sample_positives(model, scheduler, anchors, candidates, w=w, steps=steps, eta=eta,
                                  generator=generators, mix_depth=depth, guidance=guidance,
                                  labels=None if guidance is None else torch.from_numpy(labels))
        seconds = time.time() - started
        pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        predicted = classifier.predict(grey(pixels.reshape(-1, *pixels.shape[2:]))).reshape(len(index), -1)
        kept = predicted == labels[:, None]
        distance = (images - anchors[:, None]).flatten(2).norm(dim=-1).numpy()
        row = {"w": w, "mix_depth": depth, "guidance": guidance, "class_kept": float(kept.mean()),
               "anchors_with_all_candidates_kept": float(kept.all(1).mean()),
               "l2_to_anchor": float(distance.mean()), "l2_to_anchor_of_kept": float(distance[kept].mean()),
               "pairwise_l2": mean_pairwise_l2(images),
               "seconds": round(seconds, 1), "choices": []}
        rankings = {f"top-{{m}} by score t {t}": bottleneck_agreement(
            model, scheduler, anchors, images, timestep=t, generator=torch.Generator().manual_seed(seed))
            for t in _ints(score_timesteps)}
        rankings["top-{m} nearest in pixels"] = -distance  # does the score know more than closeness?
        for m in _ints(top_ms):
            row["choices"] += [_top_m(name.format(m=m), ranking, kept, distance, images, m)
                               for name, ranking in rankings.items()]
        rows.append(row)
        click.echo(f"w {w} depth {depth} guidance {guidance}: kept {row['class_kept']:.3f} in {seconds:.0f} s",
                   err=True)
    chance = float(np.max(np.bincount(labels, minlength=10)) / len(labels))
    click.echo(f"{len(index)} test anchors x {candidates} candidates, {steps} DDIM steps, eta {eta}; "
               f"L2 in the [-1, 1] pixel range; chance (most frequent class) {chance:.3f}")
    _print(rows)
    write_json_atomic(out, {"anchors": len(index), "candidates": candidates, "steps": steps, "eta": eta,
                            "seed": seed, "chance": chance, "rows": rows})
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
