"""The authors' artefacts: their DDPM checkpoints (``clsp ddpm convert``), released encoders (``clsp encoder
import``) and synthetic sets (``clsp shards import``).

The reference U-Net (``authors_reference.py``) is written from the structure of the authors' network as
``fixtures/authors-unet-state-dict.json`` describes it, with their module names, so its ``state_dict`` is a
checkpoint as their training script saves it; the JSON's tensor lists, read from their code, pin both
configurations' names and shapes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torch import nn

from authors_reference import (
    ATTN,
    BLOCKS,
    CH,
    CIFAR10,
    CIFAR10_CONFIG,
    MULT,
    SIZE,
    SMALL,
    ReferenceUNet,
    T,
    convert_reference,
    from_listing,
    listing,
    one_error_line,
    reference_model,
    reference_positives,
    run_convert,
    write_artefacts,
)
from clsp.datasets import NORMALISATION, get_dataset
from clsp.evaluate.cli import evaluate
from clsp.generate.authors_unet import AuthorsConfig, authors_tensors
from clsp.generate.cli import gen
from clsp.generate.job import anchor_seed
from clsp.generate.unet import load_unet
from clsp.images import to_float
from clsp.shards import reader
from clsp.shards.cli import shards
from clsp.train.backbones import load_encoder
from clsp.train.cli import train
from clsp.train.encoder_cli import encoder
from support import tiny

# --- clsp ddpm convert ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("listed, config", [(SMALL, {"T": T, "channel": CH, "channel_mult": MULT, "attn": ATTN,
                                                      "num_res_blocks": BLOCKS, "img_size": SIZE, "beta_1": 1e-4,
                                                      "beta_T": 0.02}), (CIFAR10, CIFAR10_CONFIG)],
                         ids=["small", "cifar10"])
def test_reference_and_converter_know_exactly_the_listed_tensors(listed, config):
    cfg = AuthorsConfig.model_validate(config)
    with torch.device("meta"):  # names, dtypes and shapes only
        reference = ReferenceUNet(cfg.T, cfg.channel, cfg.channel_mult, cfg.attn, cfg.num_res_blocks, cfg.dropout)
    assert listing(reference.state_dict()) == listed
    read = {name: tuple(shape) for name, (_, *shape) in listed.items() if not name.startswith("encoder.projector.")}
    assert authors_tensors(cfg) == read and len(read) == len(listed) - 9


@pytest.mark.parametrize("which", ["small", "cifar10"])
def test_a_state_dict_of_exactly_the_listed_tensors_converts(which, tmp_path):
    listed, config = (SMALL, {}) if which == "small" else (CIFAR10, CIFAR10_CONFIG)
    cfg = AuthorsConfig.model_validate({**CIFAR10_CONFIG, "channel": CH, "channel_mult": MULT,
                                        "num_res_blocks": BLOCKS, "img_size": SIZE, **config})
    ckpt, yaml_path = write_artefacts(tmp_path, from_listing(listed, cfg.T, cfg.channel), **config)
    result = run_convert(ckpt, yaml_path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert record["layout"] == "split" and record["checkpoint"] == "state_dict" and record["cast_to_float32"] == {}
    assert record["ignored"]["tensors"] == sorted(n for n in listed if n.startswith("encoder.projector."))
    unet, _ = load_unet(str(tmp_path / "out"))
    assert sum(p.numel() for p in unet.parameters()) == sum(
        math.prod(shape) for name, (_, *shape) in listed.items()
        if not name.startswith(("encoder.projector.", "time_embedding.timembedding.0.")))


def test_converted_model_predicts_the_references_noise(tmp_path):
    from clsp.generate.unet_split import interpolated_noise_prediction

    reference, out = convert_reference(tmp_path)
    unet, scheduler = load_unet(str(out))
    gen = torch.Generator().manual_seed(1)
    x, anchor = torch.randn(3, 3, SIZE, SIZE, generator=gen), torch.randn(3, 3, SIZE, SIZE, generator=gen)
    for t in (0, 1, 500, 999):
        timesteps = torch.full((3,), t, dtype=torch.long)
        with torch.no_grad():
            expected, got = reference(x, timesteps), unet(x, timesteps).sample
            assert expected.abs().max() > 0.1  # a real prediction, not a vanishing one
            assert (got - expected).abs().max() < 1e-4, t
            for w in (0.0, 0.1):  # the bottleneck mixed with the anchor's, the skips the sample's
                expected = reference.interpolated(x, timesteps, anchor, w)
                got = interpolated_noise_prediction(unet, x, timesteps, anchor, w)
                assert (expected - reference(x, timesteps)).abs().max() > 0.01  # the anchor matters
                assert (got - expected).abs().max() < 1e-4, (t, w)
    assert scheduler.config.num_train_timesteps == T and scheduler.config.beta_schedule == "linear"
    assert torch.allclose(scheduler.betas, torch.linspace(1e-4, 0.02, T))
    record = json.loads((out / "conversion.json").read_text())
    assert record["source"] == "ckpt.pt" and len(record["sha256"]) == 64 and record["authors_config"]["channel"] == CH


def test_clsp_gen_on_the_converted_folder_gives_the_references_positives(tmp_path, one_thread):
    """T = 100 here: at T = 1000 DDIM's first step divides by sqrt(alpha_bar_999) = 0.006, so a random-weight
    network's samples are all clipped to +-1 and say little, and float rounding is amplified 150 times."""
    reference, out = convert_reference(tmp_path, steps=100)
    shard_dir = tmp_path / "shards"
    k, steps, eta, w, anchors = 2, 4, 0.5, 0.1, 2
    result = CliRunner().invoke(gen, ["--dataset", "digits", "--unet", str(out), "--shards", str(shard_dir),
                                      "--limit", str(anchors), "--candidates", str(k), "--steps", str(steps),
                                      "--eta", str(eta), "--interpolation", str(w), "--precision", "fp32",
                                      "--no-scores", "--no-preview", "--shard-size", str(anchors)])
    assert result.exit_code == 0, result.output
    _, scheduler = load_unet(str(out))
    alpha_bar = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).tolist()
    digits = get_dataset("digits")
    for sample in reader.ShardDirectory.open(shard_dir).samples():
        i = sample.anchor_index
        anchor = to_float(digits.array([i]), signed=True)[0]
        expected = reference_positives(reference, alpha_bar, anchor, k, w, steps, eta,
                                       torch.Generator().manual_seed(anchor_seed(0, i)))
        stored = torch.from_numpy(sample.positives).permute(0, 3, 1, 2).double()
        # the shard keeps 8 bits: each pixel is the reference's value rounded to the nearest of 256 levels
        assert (stored - (expected.double() + 1) * 127.5).abs().max() <= 0.5 + 0.01, i
        assert (expected.abs() < 0.99).float().mean() > 0.1  # not only clipped pixels


def flat(state: dict) -> dict:
    """The same tensors in pytorch-ddpm's flat layout (no encoder./decoder. parents, no projector)."""
    return {name.removeprefix("encoder.").removeprefix("decoder."): value for name, value in state.items()
            if not name.startswith("encoder.projector.")}


def test_pytorch_ddpm_checkpoint_with_both_weights_uses_the_chosen_one(tmp_path):
    ema, net = reference_model(0), reference_model(1)
    ckpt, config = write_artefacts(tmp_path, {"net_model": flat(net.state_dict()), "ema_model": flat(ema.state_dict()),
                                              "step": 10, "x_T": torch.zeros(1)})
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([250])
    for weights, model in (("ema", ema), ("net", net)):
        result = run_convert(ckpt, config, tmp_path / weights, "--weights", weights)
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / weights / "conversion.json").read_text())
        assert record["layout"] == "flat" and record["checkpoint"] == f"{weights}_model" and not record["ignored"]
        with torch.no_grad():
            got = load_unet(str(tmp_path / weights))[0](x, t).sample
            assert (got - model(x, t)).abs().max() < 1e-4, weights


def test_an_fp16_copy_is_cast_to_fp32_and_the_cast_is_recorded(tmp_path):
    reference = reference_model()
    half = {name: value.half() if value.is_floating_point() else value
            for name, value in reference.state_dict().items()}
    ckpt, config = write_artefacts(tmp_path, half)
    result = run_convert(ckpt, config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert sorted(record["cast_to_float32"]["float16"]) == sorted(authors_tensors(AuthorsConfig.model_validate(
        {**CIFAR10_CONFIG, "channel": CH, "channel_mult": MULT, "num_res_blocks": BLOCKS, "img_size": SIZE})))
    x, t = torch.randn(1, 3, SIZE, SIZE), torch.tensor([250])
    rounded = reference_model()  # the fp16 weights; diffusers computes the sinusoid table itself, exactly
    table = "time_embedding.timembedding.0.weight"
    rounded.load_state_dict({**{name: value.float() for name, value in half.items()},
                             table: reference.state_dict()[table]})
    with torch.no_grad():
        assert (load_unet(str(tmp_path / "out"))[0](x, t).sample - rounded(x, t)).abs().max() < 1e-4


@pytest.mark.parametrize("case", ["wrong-shape", "missing-key", "other-config", "not-a-checkpoint", "bad-yaml",
                                  "duplicate-key", "unknown-tensors"])
def test_checkpoints_that_do_not_fit_are_refused_in_one_line(case, tmp_path):
    state = reference_model().state_dict()
    changes = {}
    if case == "wrong-shape":
        state["encoder.downblocks.0.block1.2.weight"] = torch.zeros(32, 32, 5, 5)
    elif case == "missing-key":
        del state["decoder.upblocks.1.block2.3.bias"]
    elif case == "other-config":
        changes = {"channel_mult": [1, 2]}
    elif case == "bad-yaml":
        changes = {"attn": [3]}
    elif case == "unknown-tensors":
        state |= {"encoder.extra.weight": torch.zeros(2), "decoder.other": torch.zeros(1)}
    ckpt, config = write_artefacts(tmp_path, state, **changes)
    if case == "not-a-checkpoint":
        ckpt.write_bytes(b"not a checkpoint")
    if case == "duplicate-key":  # the authors' YAML is read within the configuration budgets
        config.write_text(config.read_text() + "channel: 64\n")
    out = tmp_path / "out"
    line = one_error_line(run_convert(ckpt, config, out))
    expected = {"wrong-shape": "encoder.downblocks.0.block1.2.weight is [32, 32, 5, 5], the config needs "
                               "[32, 32, 3, 3]",
                "missing-key": "decoder.upblocks.1.block2.3.bias missing", "other-config": "does not fit the config",
                "not-a-checkpoint": "cannot read", "bad-yaml": "attn levels [3]",
                "duplicate-key": "duplicate key 'channel'",
                "unknown-tensors": "encoder.extra.weight unexpected; decoder.other unexpected"}[case]
    assert expected in line, line
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- clsp shards import -----------------------------------------------------------------------------------------

def authors_set(path: Path, rows: int, k: int = 2, size: int = 16, seed: int = 0) -> np.ndarray:
    """A synthetic set in the authors' layout, written as they save it (np.save of a uint8 array)."""
    positives = np.random.default_rng(seed).integers(0, 256, (rows, k, size, size, 3), dtype=np.uint8)
    np.save(path, positives)
    return positives


def test_imported_set_verifies_and_trains(tmp_path):
    digits = get_dataset("digits")
    positives = authors_set(tmp_path / "digits_positives.npy", len(digits))
    shard_dir, limit = tmp_path / "shards", 40
    args = ["import", str(tmp_path / "digits_positives.npy"), "--dataset", "digits", "--shards", str(shard_dir),
            "--shard-size", "16", "--limit", str(limit)]
    result = CliRunner().invoke(shards, args)
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(shards, ["verify", str(shard_dir)]).exit_code == 0
    store = reader.ShardDirectory.open(shard_dir)
    generation = store.manifest.generation
    assert generation["source"] == "imported" and generation["file"] == "digits_positives.npy"
    assert generation["bytes"] == (tmp_path / "digits_positives.npy").stat().st_size and len(generation["sha256"]) == 64
    samples = list(store.samples())
    assert [s.anchor_index for s in samples] == list(range(limit))
    for sample in samples:  # row i is anchor i's, byte for byte, with the dataset's label
        assert np.array_equal(sample.positives, positives[sample.anchor_index])
        assert sample.label == digits.labels()[sample.anchor_index]
    again = CliRunner().invoke(shards, args)  # a rerun finds every shard complete
    assert again.exit_code == 0 and "(3 already complete)" in again.output, again.output
    out = tmp_path / "run"
    trained = CliRunner().invoke(train, ["--shards", str(shard_dir), "--out", str(out), "--epochs", "1",
                                         "--augment", "device", *tiny("simclr")])
    assert trained.exit_code == 0, trained.output
    assert json.loads((out / "train_summary.json").read_text())["steps"] == limit // 8


@pytest.mark.parametrize("case", ["rows", "image-size", "layout", "pickled"])
def test_sets_that_do_not_fit_the_dataset_are_refused_in_one_line(case, tmp_path):
    path, rows = tmp_path / "set.npy", len(get_dataset("digits"))
    if case == "rows":
        authors_set(path, rows - 1)
    elif case == "image-size":
        authors_set(path, rows, size=32)
    elif case == "layout":
        np.save(path, np.zeros((rows, 16, 16, 3), dtype=np.uint8))
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    shard_dir = tmp_path / "shards"
    result = CliRunner().invoke(shards, ["import", str(path), "--dataset", "digits", "--shards", str(shard_dir)])
    expected = {"rows": f"has {rows - 1} rows but digits/train has {rows} images",
                "image-size": "holds 32x32 images but digits's are 16x16", "layout": "uint8 [N, k, H, W, 3]",
                "pickled": "cannot read"}[case]
    assert expected in one_error_line(result)
    assert not (shard_dir / "manifest.json").exists()


# --- clsp encoder import ----------------------------------------------------------------------------------------

def authors_resnet(backbone: str, stem: str = "small", seed: int = 0) -> nn.Module:
    """A torchvision ResNet as the authors build theirs: a 3x3 stride-1 stem conv (max-pool removed for "small",
    kept for "mid") and their MLP head in ``fc``; BatchNorm statistics drawn, so eval-mode features depend on them."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, backbone)()
    features = net.fc.in_features
    net.fc = nn.Sequential(nn.Linear(features, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 256))
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "small":
        net.maxpool = nn.Identity()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return net.eval()


def import_encoder_cli(ckpt: Path, out: Path, backbone: str = "resnet18", dataset: str = "cifar10"):
    return CliRunner().invoke(encoder, ["import", str(ckpt), "--backbone", backbone, "--dataset", dataset,
                                        "--out", str(out)])


@pytest.mark.parametrize("backbone, dataset, prefix", [("resnet18", "cifar10", "module."), ("resnet50", "cifar100", ""),
                                                       ("resnet18", "stl10", "")])
def test_imported_encoder_gives_the_reference_trunks_features(backbone, dataset, prefix, tmp_path):
    import hashlib

    stem = "mid" if dataset == "stl10" else "small"
    reference = authors_resnet(backbone, stem)
    ckpt = tmp_path / f"{backbone}_{dataset}.pt"
    torch.save({prefix + name: value for name, value in reference.state_dict().items()}, ckpt)
    result = import_encoder_cli(ckpt, tmp_path / "enc", backbone, dataset)
    assert result.exit_code == 0, result.output
    net, card = load_encoder(tmp_path / "enc")
    reference.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(net(x), expected) and expected.std() > 0.01
    assert card.backbone == backbone and card.stem == stem and card.image_size == (64 if dataset == "stl10" else 32)
    assert (tuple(card.mean or ()), tuple(card.std or ())) == NORMALISATION[dataset] and card.probe_lr == 1.0
    assert card.source["file"] == ckpt.name and card.source["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".enc")]


def labelled_folder(root: Path, per_class: dict[str, int]) -> Path:
    """An image folder with train/ and test/ splits of two classes (dark and bright 8x8 images)."""
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, base in (("dark", 40), ("bright", 200)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_knn_and_linear_evaluate_an_imported_encoder(tmp_path):
    ckpt = tmp_path / "simclr_cifar10_resnet18.pt"
    torch.save(authors_resnet("resnet18").state_dict(), ckpt)
    assert import_encoder_cli(ckpt, tmp_path / "enc").exit_code == 0
    folder = labelled_folder(tmp_path / "images", {"train": 6, "test": 3})
    run = tmp_path / "run"
    for command in (["knn", "--k", "3"], ["linear", "--epochs", "2"]):
        result = CliRunner().invoke(evaluate, [*command, "--encoder", str(tmp_path / "enc"), "--dataset",
                                               f"imagefolder:{folder}", "--out", str(run), "--batch-size", "8"])
        assert result.exit_code == 0, result.output
    results = json.loads((run / "results.json").read_text())
    for command in ("knn", "linear"):
        (entry,) = results[command].values()
        assert entry["encoder"]["stem"] == "small" and entry["encoder"]["trained_on"] == "cifar10", entry
    assert results["knn"][f"imagefolder:{folder}"]["test_size"] == 6


@pytest.mark.parametrize("case", ["no-head", "other-backbone", "imagenet-stem", "unknown-tensor", "not-a-checkpoint",
                                  "integer-weights"])
def test_encoder_files_that_are_not_the_authors_are_refused_in_one_line(case, tmp_path):
    net = authors_resnet("resnet18")
    if case == "imagenet-stem":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
    state = net.state_dict()
    if case == "no-head":
        state = {name: value for name, value in state.items() if not name.startswith("fc.")}
    elif case == "unknown-tensor":
        state["layer5.weight"] = torch.zeros(3)
    elif case == "integer-weights":
        state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"].to(torch.int64)
    ckpt = tmp_path / "encoder.pt"
    torch.save(state, ckpt)
    if case == "not-a-checkpoint":
        ckpt.write_text("name: not a checkpoint\n")
    line = one_error_line(import_encoder_cli(ckpt, tmp_path / "enc", "resnet50" if case == "other-backbone"
                                             else "resnet18"))
    expected = {"no-head": "has no fc.0.weight, fc.0.bias, fc.2.weight, fc.2.bias",
                "other-backbone": "fc.0.weight is [4096, 512], but a resnet50 head takes 2048 features",
                "imagenet-stem": "conv1.weight is [64, 3, 7, 7] there, [64, 3, 3, 3] here",
                "unknown-tensor": "layer5.weight unexpected", "not-a-checkpoint": "cannot read",
                "integer-weights": "layer1.0.conv1.weight is int64, not floating point"}[case]
    assert expected in line, line
    assert not (tmp_path / "enc").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".enc")]
