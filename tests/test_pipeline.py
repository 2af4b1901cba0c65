"""`clsp run`: configuration validation, an end-to-end reduced run, and skipping what is done
(kill-and-rerun is in test_faults.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from clsp.errors import UserError
from clsp.pipeline import Pipeline, load_config, run
from clsp.train.methods import registered
from support import REPO, clsp_run, reduced_config


def test_repository_default_is_valid_and_describes_clsp_and_baseline():
    config = load_config(REPO / "pipeline.yaml")
    assert config.dataset.name == "digits"
    weights = config.train.runs
    assert len(weights) == 2 and 0.0 in weights.values() and any(w != 0 for w in weights.values())
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        assert load_config(preset).dataset.name in preset.stem


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=5", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("generate.interpolation=1.5", "'generate.interpolation': input should be less than or equal to 1 (got 1.5)"),
        ("generate.weight=0.2", "unknown key 'generate.weight'"),  # renamed to generate.interpolation
        ("generate.candidates=three",
         "'generate.candidates': input should be a valid integer, unable to parse string as an integer (got 'three')"),
        ("train.method=no-such-method",
         f"'train.method': unknown method 'no-such-method'; choose one of: {', '.join(registered())}"),
        ("train.runs.clsp=-1", "run 'clsp': clsp_lambda: input should be greater than or equal to 0 (got -1.0)"),
        ("evaluate=5", "'evaluate': input should be a valid dictionary or instance of EvaluateSettings (got 5)"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(override, message, tmp_path):
    with pytest.raises(UserError) as err:
        load_config(REPO / "pipeline.yaml", (override,))
    assert message in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(run, [str(REPO / "pipeline.yaml"), "--set", override])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_each_evaluation_has_one_switch_that_makes_its_stage():
    from clsp.evaluate.cli import EVALUATIONS
    from clsp.evaluate.config import EvaluateSettings

    every = EvaluateSettings(embed_plot=True, transfer=["digits"])
    assert set(every.jobs(dataset="digits", validation=0.0, shards="s", out="o")) == set(EVALUATIONS)
    none = EvaluateSettings(linear=False, knn=False, positives=False)
    assert none.jobs(dataset="digits", validation=0.0, shards="s", out="o") == {}
    config = load_config(REPO / "pipeline.yaml", ("evaluate.knn=false",))
    assert {name.rsplit(":", 1)[1] for name in Pipeline(config).stages if name.startswith("eval:")} == \
        set(config.evaluate.jobs(dataset="digits", validation=0.0, shards="s", out="o"))


def test_set_overrides_nested_keys_with_yaml_types():
    config = load_config(REPO / "pipeline.yaml", ("train.epochs=5", "generate.share_anchor_pass=true",
                                                  "train.runs={clsp: 0.5, baseline: 0}"))
    assert config.train.epochs == 5 and config.generate.share_anchor_pass is True
    assert config.train.runs == {"clsp": 0.5, "baseline": 0}


@pytest.mark.slow
def test_end_to_end_then_nothing_to_do(pipeline_reference, pipeline_model, cli_env):
    report = (pipeline_reference / "report.md").read_text()
    assert "clsp" in report and "baseline" in report and "linear" in report.lower()
    assert (pipeline_reference / "shards" / "preview.png").is_file()
    second = clsp_run(reduced_config(pipeline_reference.parent, pipeline_model, pipeline_reference), cli_env)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert "ran: nothing" in output and "running" not in output


@pytest.mark.slow
def test_changed_method_retrains_the_runs_in_place(pipeline_reference, pipeline_model, cli_env, tmp_path):
    """README's `clsp run pipeline.yaml --set train.method=nnclr` after the default run: the run directory
    belongs to the configuration, so the runs start over (their old checkpoints are passed over, not refused)
    and the shards are reused."""
    run_dir = tmp_path / "reference"
    shutil.copytree(pipeline_reference, run_dir)
    process = clsp_run(reduced_config(tmp_path, pipeline_model, run_dir), cli_env, "train.method=nnclr")
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert "generate: done already, skipped" in output and "train:clsp: running" in output
    assert "starting over" in output
    for name in ("clsp", "baseline"):
        assert json.loads((run_dir / "train" / name / "encoder.json").read_text())["method"] == "nnclr"
    assert "nnclr" in (run_dir / "report.md").read_text()
