"""A battery of bad inputs for every command, run in-process: each must end as one ``Error:`` line on
stderr, without a traceback, with no file that existed before changed, removed or added.

Inputs are tiny but real (digits, a tiny diffusers U-Net, real shards, an exported encoder, checkpoints
and state files as the commands write them), built once for the module and then damaged in copies.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clsp.cli import main
from clsp.datasets import get_dataset
from clsp.errors import UserError
from clsp.evaluate.features import cache_key, load_frozen_encoder
from clsp.io import save_torch_atomic
from clsp.shards import schema
from clsp.train.backbones import load_encoder
from support import make_encoder, make_train_shards, reduced_config, save_tiny_model

# A valid, small invocation per command; a case appends its bad options (click keeps an option's last value).
BASE = {
    "gen": ["gen", "--dataset", "digits", "--shards", "{tmp}/shards", "--unet", "{model}", "--limit", "8",
            "--shard-size", "8", "--candidates", "2", "--steps", "2", "--batch-size", "4", "--precision", "fp32",
            "--no-preview"],
    "train": ["train", "--shards", "{shards}", "--out", "{tmp}/run", "--backbone", "resnet-narrow", "--epochs", "1",
              "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--proj-hidden-dim", "64",
              "--proj-output-dim", "32"],
    "linear": ["eval", "linear", "--encoder", "{encoder}", "--out", "{tmp}/eval", "--epochs", "1"],
    "knn": ["eval", "knn", "--encoder", "{encoder}", "--out", "{tmp}/eval"],
    "transfer": ["eval", "transfer", "--encoder", "{encoder}", "--out", "{tmp}/eval", "--datasets", "digits",
                 "--epochs", "1"],
    "positives": ["eval", "positives", "--encoder", "{encoder}", "--out", "{tmp}/eval", "--shards", "{shards}"],
    "embed-plot": ["eval", "embed-plot", "--encoder", "{encoder}", "--out", "{tmp}/eval", "--max-points", "20"],
    "compare": ["eval", "compare", "--run", "a={evaluated}", "--out", "{tmp}/report.md"],
    "ddpm-train": ["ddpm", "train", "--dataset", "digits", "--preset", "tiny", "--out", "{tmp}/ddpm", "--steps", "1",
                   "--batch-size", "4"],
    "sample": ["ddpm", "sample", "--unet", "{model}", "--out", "{tmp}/samples.png", "--num-samples", "2",
               "--steps", "1"],
    "fid": ["ddpm", "fid", "--unet", "{model}", "--dataset", "digits", "--num-samples", "2", "--steps", "1"],
    "info": ["shards", "info"],
    "verify": ["shards", "verify"],
    "preview": ["shards", "preview", "--out", "{tmp}/grid.png", "{shards}"],
    "preview-of": ["shards", "preview", "--out", "{tmp}/grid.png"],
    "run": ["run", "{config}", "--check"],
    "run-work": ["run", "{config}"],
    "run-of": ["run"],
}

NUMBERS = {  # option -> bad values, per command: every count, size, epoch, batch, temperature and rate
    "gen": {"--candidates": ["0", "-1", "nan", "65"], "--interpolation": ["nan", "inf", "-0.1", "1.5"],
            "--steps": ["0", "1e3", "1001"], "--eta": ["nan", "-1", "inf"], "--batch-size": ["0", "-4", "1e9"],
            "--shard-size": ["0", "-8"], "--limit": ["0", "-3"], "--image-size": ["0", "100000"],
            "--seed": ["-1", str(2**64)], "--num-workers": ["0"], "--worker-index": ["-1"],
            "--mix-depth": ["-1", "65"]},
    "train": {"--epochs": ["0", "-1", "nan", "1000000"], "--batch-size": ["0", "-8", "inf", "10000000"],
              "--lr": ["nan", "inf", "0", "-0.1", "1e6"], "--temperature": ["nan", "0", "-1", "inf"],
              "--clsp-lambda": ["nan", "-1", "inf"], "--weight-decay": ["nan", "-1"],
              "--warmup-epochs": ["nan", "-1", "inf"], "--crop-min-scale": ["0", "1.5", "nan"],
              "--workers": ["-1", "1000"], "--checkpoint-every": ["0"], "--log-every": ["0"],
              "--proj-hidden-dim": ["0"], "--seed": ["-1"], "--positive-top-m": ["0", "65"],
              "--positive-tau": ["nan", "0"], "--clsp-lambda-ramp-epochs": ["nan", "-1"]},
    "linear": {"--epochs": ["0", "-1", "nan"], "--lr": ["nan", "0", "-1", "inf"], "--batch-size": ["0"]},
    "knn": {"--k": ["0", "-5", "1000000"], "--temperature": ["0", "nan", "inf", "-1"], "--batch-size": ["-1"]},
    "transfer": {"--epochs": ["0"], "--lr": ["nan"]},
    "positives": {"--limit": ["0", "-1"], "--batch-size": ["0"]},
    "embed-plot": {"--max-points": ["0", "5", "nan"], "--perplexity": ["0", "nan", "inf"]},
    "ddpm-train": {"--steps": ["0", "nan", "-1"], "--batch-size": ["0", "1e9"], "--lr": ["0", "nan", "inf", "2"],
                   "--ema-decay": ["1.5", "nan"], "--grad-clip": ["0", "nan", "inf"], "--warmup-steps": ["-1"],
                   "--checkpoint-every": ["0"], "--image-size": ["0"]},
    "sample": {"--num-samples": ["0", "-1", "100000"], "--steps": ["0", "nan"], "--eta": ["nan", "2"],
               "--scale": ["0"]},
    "fid": {"--num-samples": ["0"], "--steps": ["0"], "--batch-size": ["0"]},
    "preview": {"--num-anchors": ["0", "-1", "nan", "100000"]},
}
SETTINGS = {  # clsp run: the same kinds of bad values as pipeline.yaml keys
    "train.epochs=.nan": "train.epochs", "train.lr=.nan": "train.lr", "train.temperature=0": "train.temperature",
    "train.batch_size=-1": "train.batch_size", "generate.candidates=0": "generate.candidates",
    "generate.steps=1e9": "generate.steps", "generate.interpolation=.inf": "generate.interpolation",
    "diffusion.lr=-1": "diffusion.lr", "evaluate.linear_epochs=0": "evaluate.linear_epochs",
    "seed=-1": "seed", "dataset.image_size=0": "dataset.image_size", "train.runs={}": "runs",
}

# (command, extra arguments, a fragment the error line must contain)
OTHERS = [
    # unknown names
    ("gen", ["--dataset", "nosuch"], "unknown dataset"),
    ("gen", ["--dataset", "imagefolder:"], "imagefolder"),
    ("gen", ["--split", "val"], "splits"),
    ("gen", ["--precision", "fp8"], "--precision"),
    ("train", ["--method", "byol"], "byol"),
    ("train", ["--backbone", "vit"], "vit"),
    ("train", ["--optimizer", "adam"], "adam"),
    ("train", ["--momentum", "0.9"], "applies only to moco"),
    ("train", ["--positive-choice", "best"], "--positive-choice"),
    ("train", ["--positive-choice", "top-m"], "scores"),
    ("linear", ["--dataset", "nosuch"], "unknown dataset"),
    ("linear", ["--protocol", "mine"], "--protocol"),
    ("knn", ["--dataset", "nosuch"], "unknown dataset"),
    ("transfer", ["--datasets", ""], "--datasets"),
    ("transfer", ["--datasets", "digits,nosuch"], "nosuch"),
    ("embed-plot", ["--dataset", "nosuch"], "unknown dataset"),
    ("compare", ["--dataset", "nosuch"], "unknown dataset"),
    ("ddpm-train", ["--preset", "huge"], "--preset"),
    ("ddpm-train", ["--dataset", "nosuch"], "unknown dataset"),
    ("fid", ["--dataset", "nosuch"], "unknown dataset"),
    ("sample", ["--device", "tpu9"], "--device"),
    ("run", ["--set", "dataset.name=nosuch"], "dataset.name"),
    ("run", ["--set", "train.method=byol"], "train.method"),
    ("run", ["--set", "train.backbone=vit"], "train.backbone"),
    ("run", ["--set", "diffusion.preset=huge"], "diffusion.preset"),
    ("run", ["--set", "train.epoch=3"], "did you mean"),
    ("run", ["--set", "train.epochs"], "key.sub=value"),
    ("run", ["--only", "train:nosuch"], "not a stage"),
    # missing paths, files where directories are expected, paths under a regular file (ENOTDIR)
    ("gen", ["--unet", "{tmp}/missing"], "missing"),
    ("gen", ["--unet", "{file}"], "file"),
    ("gen", ["--dataset", "imagefolder:{file}"], "file"),
    ("gen", ["--shards", "{file}/shards"], "{file}"),
    ("gen", ["--shards", "{file}"], "file"),
    ("train", ["--shards", "{tmp}/missing"], "no manifest"),
    ("train", ["--shards", "{file}"], "file"),
    ("train", ["--out", "{file}/run"], "{file}"),
    ("train", ["--out", "{file}"], "file"),
    ("train", ["--decoded-cache-dir", "{file}/cache"], "{file}"),
    ("linear", ["--encoder", "{tmp}/missing"], "not an exported encoder"),
    ("linear", ["--encoder", "{file}"], "not an exported encoder"),
    ("linear", ["--out", "{file}/eval"], "{file}"),
    ("knn", ["--out", "{file}"], "file"),
    ("knn", ["--cache-dir", "{file}/cache"], "{file}"),
    ("positives", ["--shards", "{tmp}/missing"], "no manifest"),
    ("positives", ["--png", "{file}/histogram.png"], "{file}"),
    ("embed-plot", ["--png", "{file}/tsne.png"], "{file}"),
    ("compare", ["--run", "a={tmp}/missing"], "LABEL=RUN_DIR"),
    ("compare", ["--run", "no-label"], "LABEL=RUN_DIR"),
    ("compare", ["--run", "a={file}"], "LABEL=RUN_DIR"),
    ("compare", ["--out", "{file}/report.md"], "{file}"),
    ("ddpm-train", ["--out", "{file}/ddpm"], "{file}"),
    ("sample", ["--unet", "{tmp}/missing"], "missing"),
    ("sample", ["--unet", "{file}"], "file"),
    ("sample", ["--out", "{file}/samples.png"], "{file}"),
    ("info", ["{tmp}/missing"], "no manifest"),
    ("info", ["{file}"], "file"),
    ("verify", ["{tmp}/missing"], "no manifest"),
    ("preview", ["--out", "{file}/grid.png"], "{file}"),
    ("preview-of", ["{tmp}/missing"], "no manifest"),
    ("run", ["--set", "run_dir={file}/run"], "{file}"),
    ("run-work", ["--set", "run_dir={file}/run"], "{file}"),
    # our own formats, damaged
    ("train", ["--out", "{damaged}/train-truncated"], "cannot be read"),
    ("train", ["--out", "{damaged}/train-no-settings"], "delete it to start over"),
    ("ddpm-train", ["--out", "{damaged}/train-truncated"], "cannot be read"),
    ("ddpm-train", ["--out", "{damaged}/train-no-settings"], "delete it to start over"),
    ("linear", ["--encoder", "{damaged}/card-list"], "not an encoder card"),
    ("knn", ["--encoder", "{damaged}/card-no-backbone"], "backbone"),
    ("knn", ["--encoder", "{damaged}/card-not-json"], "not valid JSON"),
    ("knn", ["--encoder", "{damaged}/weights-truncated"], "cannot be read"),
    ("knn", ["--encoder", "{damaged}/weights-only"], "not an exported encoder"),
    ("knn", ["--cache-dir", "{damaged}/cache"], "feature cache"),
    ("knn", ["--out", "{damaged}/results-list"], "results.json"),
    ("compare", ["--run", "a={damaged}/results-list"], "results.json"),
    ("compare", ["--run", "a={damaged}/results-truncated"], "results.json"),
    ("positives", ["--shards", "{damaged}/manifest-truncated"], "manifest"),
    ("sample", ["--unet", "{damaged}/unet-config"], "config"),
    ("gen", ["--shards", "{shards}"], "--overwrite"),
    ("run-of", ["{damaged}/state-truncated.yaml"], "pipeline_state.json"),
    ("run-of", ["{damaged}/state-list.yaml"], "pipeline_state.json"),
    ("run-of", ["{damaged}/malformed.yaml"], "not valid YAML"),
    ("run-of", ["{damaged}/list.yaml"], "mapping"),
    ("run-of", ["{tmp}/missing.yaml"], "not found"),
    ("run-of", ["{damaged}"], "directory"),
    # malformed shard directories
    ("info", ["{damaged}/manifest-truncated"], "manifest"),
    ("info", ["{damaged}/manifest-list"], "manifest"),
    ("info", ["{damaged}/manifest-missing-field"], "manifest"),
    ("info", ["{tmp}"], "no manifest"),
    ("verify", ["{damaged}/shard-truncated"], "problem"),
    ("verify", ["{damaged}/shard-missing"], "problem"),
    ("verify", ["{damaged}/manifest-truncated"], "manifest"),
    ("preview-of", ["{damaged}/shard-truncated"], "damaged"),
    ("preview-of", ["{damaged}/no-shards-yet"], "no finished shards"),
    ("train", ["--shards", "{damaged}/shard-truncated"], "verification"),
    ("train", ["--shards", "{damaged}/no-shards-yet"], "finished"),
    ("positives", ["--shards", "{damaged}/shard-truncated"], "damaged"),
]


def _cases() -> list:
    cases = [(command, [option, value], option)
             for command, options in NUMBERS.items() for option, values in options.items() for value in values]
    cases += [("run", ["--set", assignment], key) for assignment, key in SETTINGS.items()]
    cases += OTHERS
    return [pytest.param(command, extra, needle, id=f"{command} {' '.join(extra)}") for command, extra, needle in cases]


CASES = _cases()


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _damaged_encoders(root: Path, encoder: Path) -> None:
    card = json.loads((encoder / "encoder.json").read_text())
    for name, text in {"card-list": "[]", "card-not-json": "{\"backbone\": ",
                       "card-no-backbone": json.dumps({k: v for k, v in card.items() if k != "backbone"})}.items():
        (_copy(encoder, root / name) / "encoder.json").write_text(text)
    _truncate(_copy(encoder, root / "weights-truncated") / "encoder.safetensors")
    (_copy(encoder, root / "weights-only") / "encoder.json").unlink()


def _damaged_runs(root: Path, encoder: Path) -> None:
    for name, state in {"train-truncated": {"model": {"w": torch.zeros(4096)}, "settings": {}},
                        "train-no-settings": {"model": {"w": torch.zeros(4)}, "epoch": 1}}.items():
        save_torch_atomic(root / name / "checkpoint.pt", state)
    _truncate(root / "train-truncated" / "checkpoint.pt")
    for name, text in {"results-list": "[]", "results-truncated": "{\"knn\": {\"dig"}.items():
        (root / name).mkdir()
        (root / name / "results.json").write_text(text)
    frozen, train = load_frozen_encoder(encoder), get_dataset("digits", "train")
    key = cache_key(frozen, train, frozen.input_spec(train), flip=False)
    cached = root / "cache" / f"digits-train-{key}.npz"
    cached.parent.mkdir()
    np.savez(cached, features=np.zeros((len(train), frozen.card.feature_dim), np.float32))
    _truncate(cached)


def _damaged_shards(root: Path, shards: Path) -> None:
    for name, text in {"manifest-truncated": None, "manifest-list": "[]", "manifest-missing-field": "drop"}.items():
        manifest = _copy(shards, root / name) / "manifest.json"
        if text is None:
            _truncate(manifest)
        elif text == "drop":
            manifest.write_text(json.dumps({k: v for k, v in json.loads(manifest.read_text()).items()
                                            if k != "num_anchors"}))
        else:
            manifest.write_text(text)
    _truncate(_copy(shards, root / "shard-truncated") / schema.shard_name(0))
    (_copy(shards, root / "shard-missing") / schema.shard_name(1)).unlink()
    make_train_shards(root / "no-shards-yet", num_anchors=16, shard_size=8, shards=[])


def _damaged_pipelines(root: Path, model: Path) -> None:
    for name, state in {"state-truncated": "{\"generate\": \"ab", "state-list": "[\"generate\"]"}.items():
        reduced_config(root, model, root / name)  # writes root / f"{name}.yaml"
        (root / name).mkdir()
        (root / name / "pipeline_state.json").write_text(state)
    (root / "malformed.yaml").write_text("train: {epochs: [1,\n")
    (root / "list.yaml").write_text("- train\n- generate\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input of the battery: good ones, and damaged copies of each format under ``damaged``."""
    root = tmp_path_factory.mktemp("world")
    model = save_tiny_model(root / "model")
    shards = make_train_shards(root / "shards", num_anchors=16, shard_size=8)
    encoder = make_encoder(root / "encoder")
    evaluated = root / "evaluated"
    evaluated.mkdir()
    (evaluated / "results.json").write_text("{}")
    (root / "a-file").write_text("a regular file\n")
    damaged = root / "damaged"
    damaged.mkdir()
    _damaged_encoders(damaged, encoder)
    _damaged_runs(damaged, encoder)
    _damaged_shards(damaged, shards)
    _damaged_pipelines(damaged, model)
    (_copy(model, damaged / "unet-config") / "config.json").write_text("{\"sample_size\": ")
    config = reduced_config(root, model, root / "pipeline-run")
    return {"root": root, "model": model, "shards": shards, "encoder": encoder, "evaluated": evaluated,
            "file": root / "a-file", "damaged": damaged, "config": config}


def fill(text: str, places: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of a place replaced by its path (other braces are YAML, kept)."""
    for name, path in places.items():
        text = text.replace(f"{{{name}}}", path)
    return text


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``roots``: size, mtime and sha256, to show that a refused command changed nothing."""
    files = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


@pytest.mark.parametrize("command, extra, needle", CASES)
def test_bad_input_is_one_error_line_and_changes_nothing(command: str, extra: list[str], needle: str,
                                                         world: dict[str, Path], tmp_path: Path):
    places = {**{key: str(value) for key, value in world.items()}, "tmp": str(tmp_path)}
    args = [fill(arg, places) for arg in BASE[command] + extra]
    before = snapshot(world["root"], tmp_path)
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fill(needle, places).lower() in lines[0].lower(), lines[0]
    assert not any(line.startswith("Error") for line in result.stdout.splitlines()), result.stdout
    assert snapshot(world["root"], tmp_path) == before


def test_every_command_of_the_battery_has_bad_inputs():
    assert {case.values[0] for case in CASES} == set(BASE)


def test_an_encoder_card_of_version_1_still_loads_and_a_newer_one_says_how_to_convert(world, tmp_path):
    v2 = json.loads((world["encoder"] / "encoder.json").read_text())
    v1 = {**{k: v for k, v in v2.items() if k not in ("schema_version", "clsp_lambda")}, "clsp_weight": 0.5}
    (_copy(world["encoder"], tmp_path / "v1") / "encoder.json").write_text(json.dumps(v1))
    net, card = load_encoder(tmp_path / "v1")
    assert card.schema_version == 2 and card.clsp_lambda == 0.5 and card.backbone == v2["backbone"]
    assert net(torch.zeros(1, 3, 16, 16)).shape == (1, card.feature_dim)
    (_copy(world["encoder"], tmp_path / "v3") / "encoder.json").write_text(json.dumps({**v2, "schema_version": 3}))
    with pytest.raises(UserError, match="schema_version.*re-export the encoder with clsp-train"):
        load_encoder(tmp_path / "v3")
