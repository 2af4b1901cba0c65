"""Class-conditional DDPMs with classifier-free guidance: training, the guided prediction, and clsp-gen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DModel

from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.generate import interpolated_noise_prediction, sample_positives
from clsp.generate.cli import gen
from clsp.generate.conditional import NULL_CLASS, drop_labels, embedding_index
from clsp.generate.config import DDPMJob
from clsp.generate.ddpm_cli import ddpm
from clsp.generate.ddpm_training import _batch, _initial_weights
from clsp.generate.unet import load_unet
from clsp.shards import reader, schema
from support import make_scheduler, make_tiny_unet

CLASSES = 10


def conditional_unet() -> UNet2DModel:
    torch.manual_seed(1)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=CLASSES + 1).eval()
    with torch.no_grad():  # distinct labels must matter: a freshly initialised embedding is large enough
        unet.class_embedding.weight.mul_(3.0)
    return unet


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cond") / "tiny-cond"
    conditional_unet().save_pretrained(directory)
    make_scheduler().save_pretrained(directory)
    return directory


def _inputs(rows: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 3, 16, 16, generator=g), torch.randn(rows, 3, 16, 16, generator=g), \
        embedding_index(torch.tensor([0, 3, 3, 9])[:rows])


def test_guidance_zero_is_the_conditional_prediction_and_w_the_guided_formula():
    unet = conditional_unet()
    x, anchor, y = _inputs()
    t = torch.tensor(500)
    with torch.no_grad():
        cond = unet(x, t, class_labels=y).sample
        null = unet(x, t, class_labels=torch.full_like(y, NULL_CLASS)).sample
    plain = interpolated_noise_prediction(unet, x, t, anchor, 1.0, class_labels=y)
    torch.testing.assert_close(plain, cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(interpolated_noise_prediction(unet, x, t, anchor, 1.0, class_labels=y, guidance=0.0),
                               cond, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond, null, atol=1e-3)  # the label changes the prediction
    guided = interpolated_noise_prediction(unet, x, t, anchor, 1.0, class_labels=y, guidance=1.8)
    torch.testing.assert_close(guided, 2.8 * cond - 1.8 * null, rtol=1e-4, atol=1e-5)
    # with the bottleneck interpolation: the same formula over the two interpolated predictions
    mixed = [interpolated_noise_prediction(unet, x, t, anchor, 0.3, class_labels=labels)
             for labels in (y, torch.full_like(y, NULL_CLASS))]
    torch.testing.assert_close(interpolated_noise_prediction(unet, x, t, anchor, 0.3, class_labels=y, guidance=0.5),
                               1.5 * mixed[0] - 0.5 * mixed[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[0], cond, atol=1e-3)  # the anchor moved it


def test_conditional_positives_follow_the_label_and_refusals_are_one_line(tiny_unet):
    unet, scheduler = conditional_unet(), make_scheduler()
    anchors = torch.rand(2, 3, 16, 16) * 2 - 1

    def draw(labels, **kwargs):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return sample_positives(unet, scheduler, anchors, 2, w=1.0, steps=3, eta=1.0, generator=gens,
                                labels=torch.tensor(labels), **kwargs)

    same = draw([1, 2], guidance=1.8)
    torch.testing.assert_close(same, draw([1, 2], guidance=1.8))
    assert not torch.allclose(same[0], draw([5, 2], guidance=1.8)[0], atol=1e-3)  # anchor 0's label differs
    torch.testing.assert_close(same[1], draw([5, 2], guidance=1.8)[1])  # anchor 1's candidates do not depend on it
    for call, message in (
            (lambda: draw([1, 2]), "pass --guidance W"),
            (lambda: draw([1, CLASSES], guidance=1.0), "the model knows 10 classes"),
            (lambda: sample_positives(unet, scheduler, anchors, 2, steps=2, guidance=1.0), "one class label per"),
            (lambda: sample_positives(tiny_unet, scheduler, anchors, 2, steps=2, guidance=1.0),
             "--guidance needs a class-conditional model")):
        with pytest.raises(UserError) as error:
            call()
        assert message in str(error.value) and "\n" not in str(error.value)


def test_label_dropout_replaces_the_whole_batch_by_the_null_class():
    index = embedding_index(torch.tensor([0, 4, 9]))
    assert index.tolist() == [1, 5, 10]
    g = torch.Generator().manual_seed(0)
    assert drop_labels(index, 1.0, g).tolist() == [NULL_CLASS] * 3 and drop_labels(index, 0.0, g).tolist() == [1, 5, 10]
    images, labels = torch.zeros(20, 16, 16, 3, dtype=torch.uint8), torch.arange(20) % CLASSES
    job = DDPMJob(name="digits", out="x", preset="tiny", batch_size=8, conditional=True, label_dropout=0.5)
    dropped = [bool((_batch(images, job, step, 0, 1, 1000, labels)[3] == NULL_CLASS).all()) for step in range(200)]
    assert 0.35 < sum(dropped) / len(dropped) < 0.65  # about half the steps, whole batches at a time
    kept = next(step for step, d in enumerate(dropped) if not d)
    assert (_batch(images, job, kept, 0, 1, 1000, labels)[3] > NULL_CLASS).all()
    with pytest.raises(ValueError, match="label_dropout applies to a class-conditional model"):
        DDPMJob(name="digits", out="x", label_dropout=0.2)


def test_conditional_training_resumes_and_records_its_classes(tmp_path):
    out = tmp_path / "cond"
    args = ["train", "--dataset", "digits", "--preset", "tiny", "--out", str(out), "--batch-size", "8",
            "--conditional", "--sample-every", "100000", "--checkpoint-every", "2"]
    first = CliRunner().invoke(ddpm, [*args, "--steps", "2"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(ddpm, [*args, "--steps", "4"])
    assert second.exit_code == 0, second.output
    summary = json.loads((out / "training.json").read_text())
    assert summary["conditional"] is True and summary["num_classes"] == CLASSES
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    unet, _ = load_unet(str(out))
    assert unet.config.num_class_embeds == CLASSES + 1
    unconditional = [arg for arg in args if arg != "--conditional"]
    other = CliRunner().invoke(ddpm, [*unconditional, "--steps", "4"])  # the same folder, unconditional: refused
    assert other.exit_code != 0 and "other settings" in other.output


def test_a_conditional_model_from_an_unconditional_one_starts_as_that_model(tmp_path):
    source = tmp_path / "uncond"
    make_tiny_unet().save_pretrained(source)
    make_scheduler().save_pretrained(source)
    plain = load_unet(str(source))[0]
    torch.manual_seed(5)
    cond = UNet2DModel.from_config({**dict(plain.config), "num_class_embeds": CLASSES + 1}).eval()
    _initial_weights(cond, str(source))
    assert not cond.class_embedding.weight.any()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(cond(x, t, class_labels=torch.tensor([3, 0])).sample, plain(x, t).sample)
    small = UNet2DModel.from_config({**dict(plain.config), "block_out_channels": (4, 8), "norm_num_groups": 2})
    with pytest.raises(UserError, match="do not fit"):
        _initial_weights(small, str(source))


def test_conditional_training_refuses_a_dataset_without_labels(tmp_path):
    from PIL import Image

    folder = tmp_path / "flat"
    folder.mkdir()
    digits = get_dataset("digits")
    for i in range(8):
        Image.fromarray(digits.array([i])[0]).save(folder / f"{i}.png")
    result = CliRunner().invoke(ddpm, ["train", "--dataset", f"imagefolder:{folder}", "--preset", "tiny", "--out",
                                       str(tmp_path / "m"), "--steps", "2", "--batch-size", "4", "--conditional"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and "--conditional needs a class label" in errors[0]


JOB = ["--dataset", "digits", "--limit", "6", "--shard-size", "6", "--candidates", "2", "--steps", "2",
       "--batch-size", "3", "--precision", "fp32", "--no-preview"]


def test_clsp_gen_records_the_label_and_guidance_of_each_positive(cond_dir, tmp_path):
    shards = tmp_path / "shards"
    result = CliRunner().invoke(gen, [*JOB, "--shards", str(shards), "--unet", str(cond_dir), "--guidance", "1.8",
                                      "--interpolation", "0.5"])
    assert result.exit_code == 0, result.output
    manifest = reader.read_manifest(shards)
    assert manifest.generation["guidance"] == 1.8 and manifest.generation["interpolation"] == 0.5
    labels = get_dataset("digits").labels()
    records = list(reader.ShardDirectory.open(shards).samples())
    assert len(records) == 6
    assert [s.condition for s in records] == [int(labels[s.anchor_index]) for s in records]
    assert {s.guidance for s in records} == {1.8}


def test_clsp_gen_guidance_without_unet_takes_the_shipped_conditional_digits_model(tmp_path):
    shards = tmp_path / "shards"
    result = CliRunner().invoke(gen, [*JOB, "--shards", str(shards), "--guidance", "1.8"])
    assert result.exit_code == 0, result.output
    manifest = reader.read_manifest(shards)
    assert manifest.generation["unet"] == "default for digits: digits-ddpm-cond"
    assert {s.guidance for s in reader.ShardDirectory.open(shards).samples()} == {1.8}


@pytest.mark.parametrize("model,extra,message", [
    ("plain", ["--guidance", "1"], "--guidance needs a class-conditional model"),
    ("cond", [], "pass --guidance W"),
])
def test_clsp_gen_guidance_mismatch_is_one_error_line(model, extra, message, cond_dir, tmp_path):
    plain = tmp_path / "plain"
    make_tiny_unet().save_pretrained(plain)
    make_scheduler().save_pretrained(plain)
    shards = tmp_path / "s"
    result = CliRunner().invoke(gen, [*JOB, "--shards", str(shards), "--unet", str(plain if model == "plain" else
                                                                                    cond_dir), *extra])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and len(errors) == 1 and message in errors[0], result.output
    assert not (shards / "manifest.json").exists()


def test_a_record_with_a_condition_needs_its_guidance():
    base = {"anchor_index": 0, "label": 3, "candidates": 1}
    assert schema.SampleRecord.model_validate({**base, "condition": 3, "guidance": 1.8}).condition == 3
    with pytest.raises(ValueError, match="condition and guidance come together"):
        schema.SampleRecord.model_validate({**base, "condition": 3})
