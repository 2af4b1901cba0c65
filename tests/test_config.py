"""One typed source for every setting: commands derive from the models, and bad values stop before work."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from clsp.config import cli_fields, option_name
from clsp.errors import UserError
from clsp.pipeline import Pipeline, load_config, run

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    from clsp.evaluate.cli import EVALUATIONS, evaluate
    from clsp.evaluate.config import CompareJob
    from clsp.generate.cli import gen
    from clsp.generate.config import DDPMJob, FIDJob, GenerateJob, SampleJob
    from clsp.generate.ddpm_cli import ddpm
    from clsp.train.cli import train
    from clsp.train.config import TrainJob

    yield gen, GenerateJob
    yield train, TrainJob
    yield ddpm.commands["train"], DDPMJob
    yield ddpm.commands["sample"], SampleJob
    yield ddpm.commands["fid"], FIDJob
    for name, (model, _) in EVALUATIONS.items():
        yield evaluate.commands[name], model
    yield evaluate.commands["compare"], CompareJob


@pytest.mark.parametrize("command, model", [pytest.param(c, m, id=m.__name__) for c, m in _commands()])
def test_no_command_line_default_differs_from_the_model(command: click.Command, model):
    params = {param.name: param for param in command.params if isinstance(param, click.Option)}
    assert set(params) == set(cli_fields(model))
    for name in cli_fields(model):
        info = model.model_fields[name]
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        option = params[name]
        assert option.required == info.is_required(), name
        if not info.is_required():
            assert option.default == default or (option.multiple and tuple(option.default) == default), name
        assert option_name(model, name) in option.opts, name


@pytest.mark.parametrize("assignment, key", [
    ("generate.eta=2", "generate.eta"), ("generate.steps=5000", "generate.steps"),
    ("train.backbone=vit", "train.backbone"), ("diffusion.preset=nope", "diffusion.preset"),
    ("dataset.name=nosuch", "dataset.name"), ("evaluate.transfer=[1,2]", "evaluate.transfer"),
    ("train.lr=.nan", "train.lr"), ("train.runs={clsp: .inf}", "train.runs.clsp"),
    ("train.epoch=3", "train.epoch"), ("train.runs={a: {method: byol}}", "train"),
    ("train.workers=-1", "train.workers"), ("evaluate.transfer=[nosuch]", "evaluate.transfer"),
    ("dataset.split=val", "dataset.split"), ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=3", "train"),  # the default's 5-epoch lambda ramp cannot fit: refused before any work
])
def test_check_refuses_each_bad_value_in_one_line_naming_the_key(assignment: str, key: str, tmp_path: Path):
    result = CliRunner().invoke(run, [str(ROOT / "pipeline.yaml"), "--check", "--set", assignment,
                                      "--set", f"run_dir={tmp_path / 'run'}"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and f"'{key}" in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_check_refuses_a_diffusion_model_that_does_not_fit(tiny_model_dir: Path, tmp_path: Path):
    result = CliRunner().invoke(run, [str(ROOT / "pipeline.yaml"), "--check", "--set", "dataset.image_size=32",
                                      "--set", f"diffusion.unet={tiny_model_dir}"])
    assert result.exit_code == 1 and "16x16" in result.output and "--image-size 16" in result.output


def test_method_only_settings_are_refused_for_other_methods():
    with pytest.raises(UserError, match="queue-size applies only"):
        Pipeline(load_config(ROOT / "pipeline.yaml", ("train.queue_size=64",)))


def _prints(*overrides: str) -> dict[str, str]:
    return Pipeline(load_config(ROOT / "pipeline.yaml", overrides)).fingerprints()


def test_toggling_one_evaluation_changes_only_its_fingerprint():
    before, after = _prints("evaluate.embed_plot=false"), _prints("evaluate.embed_plot=true")
    assert set(after) - set(before) == {"eval:clsp:embed-plot", "eval:baseline:embed-plot"}
    assert all(after[name] == value for name, value in before.items())


def test_adding_a_run_changes_nothing_else_and_other_settings_reach_downstream():
    before = _prints()
    after = _prints("train.runs={clsp: 0.3, baseline: 0.0, more: 0.5}")
    assert {name for name in after if name not in before} == {
        "train:more", "eval:more:linear", "eval:more:knn", "eval:more:positives", "eval:more:embed-plot"}
    assert all(after[name] == value for name, value in before.items())
    changed = _prints("train.lr=0.4")
    assert changed["generate"] == before["generate"] and changed["train:clsp"] != before["train:clsp"]
    assert changed["eval:clsp:knn"] != before["eval:clsp:knn"]  # downstream of the changed run


def test_report_sections_are_replaced_not_duplicated(tmp_path: Path):
    from clsp.evaluate.report import write_section

    write_section(tmp_path, "linear probe: digits", "first")
    write_section(tmp_path, "kNN: digits", "knn")
    write_section(tmp_path, "linear probe: digits", "second")
    text = (tmp_path / "report.md").read_text()
    assert text.count("## linear probe: digits") == 1 and "second" in text and "first" not in text
    assert "## kNN: digits" in text


def test_cli_refuses_non_finite_numbers_in_one_line(tmp_path: Path):
    from clsp.train.cli import train

    for flag, value in (("--lr", "nan"), ("--clsp-lambda", "inf"), ("--temperature", "0"), ("--batch-size", "0")):
        result = CliRunner().invoke(train, ["--shards", str(tmp_path), "--out", str(tmp_path / "o"), flag, value])
        assert result.exit_code == 1 and result.output.startswith(f"Error: {flag}:"), result.output
        assert len(result.output.strip().splitlines()) == 1
