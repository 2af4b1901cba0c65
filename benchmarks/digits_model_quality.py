"""Does the shipped digits DDPM draw recognisable digits?

The reference classifier (``digits_reference.py``) labels 1,000 unconditional DDIM samples of the
model. Recognisable digits get confident predictions (compare with the classifier's confidence on
the real test split) spread over all ten classes.
The distance from each sample to its nearest real training digit, relative to that of the real test
digits, shows whether the samples look like digits at all (about 1: as close as unseen real digits).

    python benchmarks/digits_model_quality.py [--unet FOLDER] [--num-samples 1000] [--steps 50]

Prints a table and writes benchmarks/results/digits_model_quality.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np
from sklearn.neighbors import NearestNeighbors

from clsp.datasets import get_dataset
from clsp.errors import Command
from clsp.generate.unet import check_compatible, load_unet, resolve_unet, sample_images
from clsp.io import write_json_atomic
from digits_reference import DESCRIPTION, fit_reference_classifier, grey

RESULTS = Path(__file__).parent / "results" / "digits_model_quality.json"


def _confidence(probs: np.ndarray) -> dict:
    top = probs.max(1)
    return {"mean_max_prob": float(top.mean()), "median_max_prob": float(np.median(top)),
            "frac_max_prob_over_0.9": float((top > 0.9).mean())}


@click.command(cls=Command, context_settings={"show_default": True})
@click.option("--unet", default=None, help="Model folder [default: the shipped digits model].")
@click.option("--num-samples", type=int, default=1000)
@click.option("--steps", type=int, default=50, help="DDIM steps (eta 0).")
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(dir_okay=False), default=str(RESULTS))
def main(unet: str | None, num_samples: int, steps: int, seed: int, out: str) -> None:
    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    classifier, train_x = fit_reference_classifier()
    neighbours = NearestNeighbors(n_neighbors=1).fit(train_x)
    test_x = grey(test.array(range(len(test))))
    accuracy = float((classifier.predict(test_x) == test.labels()).mean())
    real = _confidence(classifier.predict_proba(test_x))
    real_nn = float(neighbours.kneighbors(test_x)[0].mean())

    unet = resolve_unet(unet, "digits")
    model, scheduler = load_unet(unet)
    check_compatible(model.config, train.image_size)
    started = time.time()
    samples = sample_images(model, scheduler, num_samples, steps=steps, seed=seed)
    sample_s = time.time() - started
    sample_x = grey(samples)
    probs = classifier.predict_proba(sample_x)
    generated = _confidence(probs)
    sample_nn = float(neighbours.kneighbors(sample_x)[0].mean())
    exact_copies = float((neighbours.kneighbors(sample_x)[0][:, 0] < 1e-6).mean())
    histogram = np.bincount(probs.argmax(1), minlength=10)

    result = {
        "unet": Path(unet).name, "num_samples": num_samples, "ddim_steps": steps, "seed": seed,
        "sampling_s": round(sample_s, 1),
        "classifier": DESCRIPTION,
        "classifier_test_accuracy": accuracy, "real_test": real, "generated": generated,
        "class_histogram": histogram.tolist(),
        "nearest_train_distance": {"real_test": real_nn, "generated": sample_nn, "ratio": sample_nn / real_nn},
        "frac_exact_training_copies": exact_copies,
        "class_entropy_bits": float(-(p := histogram / histogram.sum())[p > 0] @ np.log2(p[p > 0])),
    }
    click.echo(f"classifier test accuracy on real digits: {accuracy:.3f}")
    click.echo(f"{'':24}{'mean max-prob':>15}{'median':>9}{'>0.9':>8}{'NN dist to train':>18}")
    for name, row, nn in (("real test digits", real, real_nn), (f"{num_samples} DDIM samples", generated, sample_nn)):
        click.echo(f"{name:24}{row['mean_max_prob']:>15.3f}{row['median_max_prob']:>9.3f}"
                   f"{row['frac_max_prob_over_0.9']:>8.3f}{nn:>18.3f}")
    click.echo("class histogram: " + "  ".join(f"{c}:{n}" for c, n in enumerate(histogram)) +
               f"   (entropy {result['class_entropy_bits']:.2f} of 3.32 bits)")
    write_json_atomic(out, result)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
