"""The presets resolve to exactly the authors' recipes: METHOD.md section 3's table, transcribed here."""

from __future__ import annotations

from pathlib import Path

import pytest

from clsp.pipeline import Pipeline, load_config
from clsp.train.augment import view_augmentations

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# METHOD.md section 3, column by column (ResNet-18, CIFAR stem, 1000 epochs).
COMMON = {"epochs": 1000, "optimizer": "sgd", "weight_decay": 1e-4, "weight_decay_scope": "all",
          "warmup_epochs": 10, "temperature": 0.2, "proj_hidden_dim": 4096, "proj_output_dim": 256,
          "backbone": "resnet18", "crop_min_scale": 0.08, "flip": True}
TABLE = {
    ("simclr", "cifar10"): {"batch_size": 1024, "lr": 0.5, "clsp_lambda": 1.0, "jitter": (0.4, 0.4, 0.4, 0.1),
                            "solarize_p": 0.0, "probe_lr": 1.0},
    ("simclr", "cifar100"): {"batch_size": 1024, "lr": 0.5, "clsp_lambda": 1.0, "jitter": (0.4, 0.4, 0.4, 0.1),
                             "solarize_p": 0.0, "probe_lr": 1.0},
    ("moco", "cifar10"): {"batch_size": 512, "lr": 0.3, "clsp_lambda": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1),
                          "solarize_p": 0.2, "probe_lr": 1.0, "queue_size": 32768, "momentum": 0.99,
                          "momentum_end": 0.999},
    ("moco", "cifar100"): {"batch_size": 512, "lr": 0.3, "clsp_lambda": 0.2, "jitter": (0.4, 0.4, 0.2, 0.1),
                           "solarize_p": 0.2, "probe_lr": 10.0, "queue_size": 32768, "momentum": 0.99,
                           "momentum_end": 0.999},
}


def _resolved_runs(dataset: str) -> dict:
    pipeline = Pipeline(load_config(CONFIGS / f"{dataset}.yaml"))
    return {name.split(":", 1)[1]: stage.job.resolved(dataset) for name, stage in pipeline.stages.items()
            if name.startswith("train:")}


@pytest.mark.parametrize("method, dataset", list(TABLE))
@pytest.mark.parametrize("baseline", [False, True])
def test_preset_runs_resolve_to_the_authors_recipe(method: str, dataset: str, baseline: bool):
    from clsp.train.recipes import RECIPES

    runs = _resolved_runs(dataset)
    job = runs[method if baseline else f"clsp-{method}"]
    expected = {**COMMON, **TABLE[method, dataset]}
    if baseline:
        expected["clsp_lambda"] = 0.0
    assert job.method == method
    for key in COMMON.keys() | {"batch_size", "lr", "clsp_lambda", "queue_size", "momentum", "momentum_end"}:
        assert getattr(job, key) == pytest.approx(expected.get(key)), key
    first, second = view_augmentations(job.method, job.model_dump())
    assert first == second  # SimCLR and MoCo: the same list for every view
    assert (first.brightness, first.contrast, first.saturation, first.hue) == expected["jitter"]
    assert (first.jitter_p, first.grayscale_p, first.solarize_p) == (0.8, 0.2, expected["solarize_p"])
    assert RECIPES[method].for_dataset(dataset)["probe_lr"] == expected["probe_lr"]


def test_nnclr_keeps_solo_learns_recipe():
    from clsp.train.config import TrainJob

    job = TrainJob(method="nnclr", shards="s", out="o").resolved("cifar10")
    assert (job.batch_size, job.lr, job.optimizer, job.weight_decay, job.weight_decay_scope) == \
        (256, 0.4, "lars", 1e-5, "weights")
    assert (job.proj_hidden_dim, job.proj_output_dim, job.pred_hidden_dim, job.queue_size) == (2048, 256, 4096, 65536)
    first, second = view_augmentations("nnclr", job.model_dump())
    assert (first.saturation, first.solarize_p) == (0.4, 0.0) and (second.saturation, second.solarize_p) == (0.2, 0.2)


def test_cifar10_normalisation_is_the_authors():
    from clsp.datasets import NORMALISATION

    assert NORMALISATION["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert NORMALISATION["cifar100"] == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
