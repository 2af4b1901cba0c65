"""The presets resolve to exactly the authors' recipes and protocols: METHOD.md sections 3-4, transcribed here."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from clsp.pipeline import Pipeline, load_config
from clsp.train.augment import ColorJitterPerImage, view_augmentations
from clsp.train.config import TrainJob

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# METHOD.md section 3's table, column by column (ResNet-18, CIFAR stem, 1000 epochs); rows shared by all four.
COMMON = {"epochs": 1000, "optimizer": "sgd", "weight_decay": 1e-4, "weight_decay_scope": "all",
          "warmup_epochs": 10, "warmup_start_lr": 1e-3, "schedule_unit": "epoch", "temperature": 0.2,
          "proj_hidden_dim": 4096, "proj_output_dim": 256, "backbone": "resnet18", "crop_min_scale": 0.08,
          "flip": True, "precision": "fp32"}
TABLE = {
    ("simclr", "cifar10"): {"batch_size": 1024, "lr": 0.5, "clsp_lambda": 1.0, "jitter": (0.4, 0.4, 0.4, 0.1),
                            "solarize_p": 0.0, "probe_lr": 1.0, "forward": "joint"},
    ("simclr", "cifar100"): {"batch_size": 1024, "lr": 0.5, "clsp_lambda": 1.0, "jitter": (0.4, 0.4, 0.4, 0.1),
                             "solarize_p": 0.0, "probe_lr": 1.0, "forward": "joint"},
    ("moco", "cifar10"): {"batch_size": 512, "lr": 0.3, "clsp_lambda": 0.5, "jitter": (0.4, 0.4, 0.2, 0.1),
                          "solarize_p": 0.2, "probe_lr": 1.0, "forward": "separate", "queue_size": 32768,
                          "momentum": 0.99, "momentum_end": 0.999},
    ("moco", "cifar100"): {"batch_size": 512, "lr": 0.3, "clsp_lambda": 0.2, "jitter": (0.4, 0.4, 0.2, 0.1),
                           "solarize_p": 0.2, "probe_lr": 10.0, "forward": "separate", "queue_size": 32768,
                           "momentum": 0.99, "momentum_end": 0.999},
}
BASELINE_PROBE_LR = 1.0  # "the MoCo C100 *baseline* keeps 1.0"
K_CANDIDATES = 8
# The authors' normalisation (METHOD.md section 3), and solo-learn's CIFAR-10 std for NNCLR.
AUTHORS_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
                 "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                 "stl10": ((0.4914, 0.4823, 0.4466), (0.247, 0.243, 0.261))}  # their simclr_stl10 recipe's
SOLO_LEARN_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _preset(dataset: str) -> Pipeline:
    return Pipeline(load_config(CONFIGS / f"{dataset}.yaml"))


def _resolved_runs(dataset: str) -> dict:
    return {name.split(":", 1)[1]: stage.job.resolved(dataset) for name, stage in _preset(dataset).stages.items()
            if name.startswith("train:")}


@pytest.mark.parametrize("method, dataset", list(TABLE))
@pytest.mark.parametrize("baseline", [False, True])
def test_preset_runs_resolve_to_the_authors_recipe(method: str, dataset: str, baseline: bool):
    from clsp.train.recipes import normalisation, probe_lr

    job = _resolved_runs(dataset)[method if baseline else f"clsp-{method}"]
    expected = {**COMMON, **TABLE[method, dataset]}
    if baseline:
        expected.update(clsp_lambda=0.0, probe_lr=BASELINE_PROBE_LR)
    assert job.method == method
    for key in COMMON.keys() | {"batch_size", "lr", "clsp_lambda", "forward", "queue_size", "momentum",
                                "momentum_end"}:
        assert getattr(job, key) == pytest.approx(expected.get(key)), key
    first, second = view_augmentations(job.method, job.model_dump())
    assert first == second  # SimCLR and MoCo: the same list for every view
    assert (first.brightness, first.contrast, first.saturation, first.hue) == expected["jitter"]
    assert (first.jitter_p, first.grayscale_p, first.solarize_p) == (0.8, 0.2, expected["solarize_p"])
    # what the trainer writes into the encoder card, which the linear probe reads
    assert probe_lr(method, dataset, job.clsp_lambda) == expected["probe_lr"]
    from clsp.datasets import NORMALISATION

    assert normalisation(method, dataset, NORMALISATION[dataset]) == AUTHORS_STATS[dataset]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "stl10"])
def test_presets_train_and_sample_in_fp32(dataset: str):
    stages = _preset(dataset).stages
    assert stages["generate"].job.precision == "fp32" and stages["generate"].job.candidates == K_CANDIDATES
    if "diffusion" in stages:  # the DDPM trained where no public one exists: fp32, as the authors trained theirs
        assert stages["diffusion"].job.precision == "fp32"
    runs = _resolved_runs(dataset)
    assert len(runs) == (2 if dataset == "stl10" else 4) and all(job.precision == "fp32" for job in runs.values())


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_the_projector_is_the_authors(method: str):
    from clsp.train.backbones import build_backbone
    from clsp.train.methods import build_method

    job = _resolved_runs("cifar10")[f"clsp-{method}"]
    built = build_method(job, build_backbone(job.backbone, "small"))
    assert [type(m) for m in built.projector] == [nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in built.projector if isinstance(m, nn.Linear)] == \
        [(512, 4096), (4096, 256)]


def test_nnclr_keeps_solo_learns_recipe():
    from clsp.datasets import NORMALISATION
    from clsp.train.config import TrainJob
    from clsp.train.optim import build_optimizer
    from clsp.train.recipes import normalisation

    job = TrainJob(method="nnclr", shards="s", out="o").resolved("cifar10")
    assert (job.batch_size, job.lr, job.optimizer, job.weight_decay, job.weight_decay_scope) == \
        (256, 0.4, "lars", 1e-5, "weights")
    assert (job.proj_hidden_dim, job.proj_output_dim, job.pred_hidden_dim, job.queue_size) == (2048, 256, 4096, 65536)
    assert (job.warmup_start_lr, job.forward, job.schedule_unit) == (3e-5, "separate", "step")
    first, second = view_augmentations("nnclr", job.model_dump())
    assert (first.brightness, first.contrast, first.saturation, first.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (first.saturation, first.solarize_p) == (0.2, 0.0) and (second.saturation, second.solarize_p) == (0.2, 0.2)
    assert dataclasses.replace(second, solarize_p=0.0) == first  # the second view only adds solarization
    mean, std = normalisation("nnclr", "cifar10", NORMALISATION["cifar10"])
    assert (mean, std) == (AUTHORS_STATS["cifar10"][0], SOLO_LEARN_CIFAR10_STD)
    assert normalisation("nnclr", "cifar100", NORMALISATION["cifar100"]) == AUTHORS_STATS["cifar100"]
    lars = build_optimizer("lars", [{"params": [nn.Parameter(torch.zeros(2))]}], lr=0.4)
    assert lars.defaults["trust_coeff"] == 0.02 and lars.defaults["trust_clip"] is True


def test_the_normalisation_is_the_authors():
    from clsp.datasets import NORMALISATION

    assert {name: NORMALISATION[name] for name in AUTHORS_STATS} == AUTHORS_STATS


def test_the_encoder_card_records_the_recipes_normalisation(tmp_path, monkeypatch):
    """The trainer normalises with the recipe's statistics where they differ from the dataset's, and records
    them in the card that evaluation normalises with."""
    from clsp.train import recipes
    from clsp.train.backbones import load_encoder
    from clsp.train.cli import train
    from support import make_train_shards

    odd_std = (0.31, 0.32, 0.33)
    nnclr = recipes.RECIPES["nnclr"]
    monkeypatch.setitem(recipes.RECIPES, "nnclr", dataclasses.replace(nnclr, by_dataset={"digits": {"std": odd_std}}))
    shards = make_train_shards(tmp_path / "shards", num_anchors=16, shard_size=16)
    result = CliRunner().invoke(train, [
        "--shards", str(shards), "--out", str(tmp_path / "run"), "--method", "nnclr", "--epochs", "1",
        "--backbone", "resnet-narrow", "--batch-size", "8", "--workers", "0", "--precision", "fp32",
        "--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32", "--queue-size", "32",
        "--augment", "cpu"])
    assert result.exit_code == 0, result.output
    _, card = load_encoder(tmp_path / "run")
    from clsp.datasets import get_dataset

    assert tuple(card.std) == pytest.approx(odd_std) and tuple(card.mean) == pytest.approx(get_dataset("digits").mean)


# Their configs/simclr_stl10.yaml and the STL-10 branch of their data and model code (METHOD.md section 3).
STL10_SIMCLR = {"epochs": 1000, "batch_size": 1024, "lr": 0.5, "warmup_start_lr": 1e-3, "warmup_epochs": 10,
                "weight_decay": 1e-4, "temperature": 0.2, "proj_hidden_dim": 4096, "proj_output_dim": 256,
                "crop_min_scale": 0.08, "flip": True, "backbone": "resnet18", "stem": "mid", "optimizer": "sgd"}


@pytest.mark.parametrize("run", ["simclr", "clsp-simclr"])
def test_the_stl10_preset_is_the_authors_simclr_recipe(run: str):
    from clsp.datasets import NORMALISATION
    from clsp.train.backbones import build_backbone
    from clsp.train.recipes import normalisation, probe_lr

    preset = _preset("stl10")
    data = preset.config.dataset
    assert (data.name, data.split, data.image_size) == ("stl10", "unlabeled", 64)
    job = _resolved_runs("stl10")[run]
    assert {name: getattr(job, name) for name in STL10_SIMCLR} == STL10_SIMCLR
    assert job.method == "simclr" and job.clsp_lambda == (1.0 if run == "clsp-simclr" else 0.0)
    assert normalisation("simclr", "stl10", NORMALISATION["stl10"]) == AUTHORS_STATS["stl10"]
    assert probe_lr("simclr", "stl10", job.clsp_lambda) == 1.0
    trunk = build_backbone(job.backbone, job.stem)  # "mid": a 3x3 stride-1 stem conv, the max-pool kept
    assert (trunk.conv1.kernel_size, trunk.conv1.stride) == ((3, 3), (1, 1)) and isinstance(trunk.maxpool, nn.MaxPool2d)
    assert trunk(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


def test_the_stem_is_a_recorded_training_setting(tmp_path):
    from clsp.train.backbones import load_encoder
    from clsp.train.cli import train
    from support import make_train_shards, tiny

    shards = make_train_shards(tmp_path / "shards", num_anchors=16, shard_size=16)
    result = CliRunner().invoke(train, ["--shards", str(shards), "--out", str(tmp_path / "run"), "--epochs", "1",
                                        "--stem", "mid", "--augment", "cpu", *tiny("simclr")])
    assert result.exit_code == 0, result.output
    net, card = load_encoder(tmp_path / "run")
    assert card.stem == "mid" and isinstance(net.maxpool, nn.MaxPool2d) and net.conv1.stride == (1, 1)


def _lr_by_step(unit: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float, base: float,
                start: float) -> list[float]:
    from clsp.train.optim import warmup_cosine

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = warmup_cosine(optimizer, unit=unit, warmup_epochs=warmup_epochs, epochs=epochs,
                              steps_per_epoch=steps_per_epoch, start_lr=start)
    rates = []
    for _ in range(epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_schedule_moves_once_per_epoch_and_peaks_in_the_last_warmup_epoch():
    """METHOD.md section 3: 10 warm-up epochs linear from 1e-3 (peak at epoch 9), then cosine to 0."""
    base, start, epochs = 0.5, 1e-3, 30
    # by hand: epochs 0..9 step by (0.5 - 0.001) / 9; epochs 10..29 follow 0.25 * (1 + cos(pi * (e - 10) / 20))
    expected = [start + e * (base - start) / 9 for e in range(10)] + \
               [0.25 * (1 + math.cos(math.pi * (e - 10) / 20)) for e in range(10, 30)]
    assert expected[0] == start and expected[9] == pytest.approx(0.5) and expected[20] == pytest.approx(0.25)
    rates = _lr_by_step("epoch", epochs=epochs, steps_per_epoch=4, warmup_epochs=10, base=base, start=start)
    by_epoch = [rates[4 * e:4 * e + 4] for e in range(epochs)]
    assert all(len(set(epoch)) == 1 for epoch in by_epoch)  # constant within each epoch
    assert [epoch[0] for epoch in by_epoch] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert by_epoch[9][0] == pytest.approx(base) and by_epoch[8][0] < base  # the peak is reached in epoch 9


def test_the_per_step_schedule_stays_one_setting_away():
    rates = _lr_by_step("step", epochs=3, steps_per_epoch=4, warmup_epochs=1, base=0.4, start=3e-5)
    assert rates[0] == pytest.approx(3e-5) and rates[4] == pytest.approx(0.4)
    assert len(set(rates[:4])) == 4 and all(a > b for a, b in zip(rates[4:], rates[5:]))


def test_colour_jitter_matches_torchvision_with_an_order_drawn_per_image():
    from torchvision.transforms.v2 import functional as TF

    jitter = ColorJitterPerImage(0.4, 0.4, 0.4, 0.1, p=0.8)
    torch.manual_seed(0)
    params = jitter.draw(128)
    orders = {tuple(row) for row in params["order"].tolist()}
    assert len(orders) > 12  # per image; a per-batch draw gives one order for all 128
    assert sorted(params["order"][0].tolist()) == [0, 1, 2, 3]
    assert 0.65 < params["applied"].float().mean() < 0.95
    images = torch.rand(128, 3, 8, 8)
    ours = jitter.apply_params(images, params)
    steps = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(len(images)):
        reference = images[i]
        if params["applied"][i]:
            for k in params["order"][i].tolist():
                reference = steps[k](reference, params["factors"][i, k].item())
        torch.testing.assert_close(ours[i], reference, atol=2e-4, rtol=0)


def test_the_device_augmentation_uses_the_per_image_jitter():
    from clsp.train.augment import DeviceAugment

    view = view_augmentations("simclr", {})[0]
    jitters = [m for m in DeviceAugment(16, (0.5,) * 3, (0.25,) * 3, view).modules()
               if "ColorJitter" in type(m).__name__]
    assert [type(m) for m in jitters] == [ColorJitterPerImage]


def test_knn_takes_the_training_features_with_a_random_flip(tmp_path, monkeypatch):
    """METHOD.md section 4: the training-set features with a random horizontal flip, the test set's without."""
    from clsp.datasets import ArrayDataset
    from clsp.evaluate import knn
    from clsp.evaluate.features import load_frozen_encoder
    from clsp.train.backbones import EncoderCard, build_backbone, export_encoder

    torch.manual_seed(0)
    net = build_backbone("resnet-narrow")
    export_encoder(net, tmp_path / "enc", EncoderCard(backbone="resnet-narrow", stem="small",
                                                      feature_dim=net.feature_dim, image_size=8))
    encoder = load_frozen_encoder(tmp_path / "enc", device="cpu")
    rng = np.random.default_rng(0)

    def dataset(split: str, n: int) -> ArrayDataset:
        return ArrayDataset(name="noise", split=split, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3,
                            images=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), targets=np.arange(n) % 2)

    train, test = dataset("train", 64), dataset("test", 16)
    seen = {}

    def record(train_features, train_labels, test_features, test_labels, **kwargs):
        seen.update(train=train_features, test=test_features)
        return {5: 50.0}

    monkeypatch.setattr(knn, "knn_accuracy", record)
    knn.knn_protocol(encoder, train, test, ks=(5,), seed=3)
    spec = encoder.input_spec(train)
    plain, mirrored = encoder.embed(train.images, spec), encoder.embed(train.images, spec, flip=True)
    is_plain = np.isclose(seen["train"], plain, atol=1e-5).all(1)
    is_mirrored = np.isclose(seen["train"], mirrored, atol=1e-5).all(1)
    assert (is_plain | is_mirrored).all()
    assert 16 < is_mirrored.sum() < 48 and 16 < is_plain.sum() < 48  # about half of each
    np.testing.assert_allclose(seen["test"], encoder.embed(test.images, spec), atol=1e-5)


@pytest.mark.parametrize("method", ["moco", "nnclr"])
def test_digits_memory_is_no_larger_than_its_training_set_and_the_paper_sizes_stay(method):
    digits = TrainJob(method=method, shards="s", out="o").resolved("digits")
    # MoCo's queue was chosen on validation (benchmarks/results/study_digits_moco_recipe.md)
    assert digits.queue_size == {"moco": 256, "nnclr": 1024}[method] and digits.queue_size < 1438 * 0.8
    paper = {"moco": 32768, "nnclr": 65536}[method]
    assert TrainJob(method=method, shards="s", out="o").resolved("cifar10").queue_size == paper
