"""`clsp run`: configuration validation, an end-to-end reduced run, skipping, and kill-and-rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from clsp.errors import UserError
from clsp.pipeline import load_config, run

REPO = Path(__file__).resolve().parents[1]


def reduced_config(tmp_path: Path, model_dir: Path, run_dir: Path) -> Path:
    """The repository's default pipeline.yaml, shrunk to seconds: tiny model, few anchors, one epoch."""
    config = yaml.safe_load((REPO / "pipeline.yaml").read_text())
    config["run_dir"] = str(run_dir)
    config["diffusion"] = {"unet": str(model_dir)}
    config["generate"].update(candidates=2, steps=2, batch_size=8, shard_size=8, limit=32, precision="fp32")
    config["train"].update(epochs=1, batch_size=8, backbone="resnet-narrow", precision="fp32", workers=0)
    config["evaluate"].update(linear_epochs=3, embed_plot=False)
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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
        ("train.method=byol", "'train.method': input should be 'simclr', 'moco' or 'nnclr' (got 'byol')"),
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


def test_set_overrides_nested_keys_with_yaml_types():
    config = load_config(REPO / "pipeline.yaml", ("train.epochs=5", "generate.share_anchor_pass=true",
                                                  "train.runs={clsp: 0.5, baseline: 0}"))
    assert config.train.epochs == 5 and config.generate.share_anchor_pass is True
    assert config.train.runs == {"clsp": 0.5, "baseline": 0}


def _clsp_run(config: Path, env: dict, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clsp.cli", "run", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _report_numbers(run_dir: Path) -> dict:
    """Every result of every run (timings excluded), to compare two reports."""
    results = {}
    for run_results in sorted((run_dir / "eval").glob("*/results.json")):
        data = json.loads(run_results.read_text().replace(str(run_dir), "RUN_DIR"))
        results[run_results.parent.name] = {
            cmd: {ds: {k: v for k, v in payload.items() if "time" not in k and "seconds" not in k}
                  for ds, payload in per_ds.items()} for cmd, per_ds in data.items()}
    return results


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"pipeline ended before the kill point:\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_end_to_end_then_nothing_to_do_then_kill_and_rerun(tmp_path, tiny_model_dir, cli_env):
    # 1. An uninterrupted reduced run: report with the CLSP run beside its baseline.
    reference = tmp_path / "reference"
    config = reduced_config(tmp_path, tiny_model_dir, reference)
    first = _clsp_run(config, cli_env)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output
    report = (reference / "report.md").read_text()
    assert "clsp" in report and "baseline" in report and "linear" in report.lower()
    assert (reference / "shards" / "preview.png").is_file()

    # 2. A second run does no work.
    second = _clsp_run(config, cli_env)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    assert "ran: nothing" in output and "running" not in output

    # 3. Killed during generation, then during training; each rerun finishes with the same results.
    killed = tmp_path / "killed"
    config = reduced_config(tmp_path, tiny_model_dir, killed)
    manifest = killed / "shards" / "manifest.json"

    def some_shards_written() -> bool:
        try:
            return len(json.loads(manifest.read_text()).get("shards", {})) >= 1
        except (OSError, ValueError):
            return False

    process = _clsp_run(config, cli_env)
    _wait_for(some_shards_written, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(json.loads(manifest.read_text())["shards"]) < json.loads(manifest.read_text())["num_shards"]

    process = _clsp_run(config, cli_env)
    _wait_for((killed / "train" / "clsp").exists, process)
    time.sleep(1.0)  # inside the training stage
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "report.md").exists()

    process = _clsp_run(config, cli_env)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    assert _report_numbers(killed) == _report_numbers(reference)
    same_report = (killed / "report.md").read_text().replace(str(killed), "RUN_DIR")
    assert same_report == (reference / "report.md").read_text().replace(str(reference), "RUN_DIR")
    assert _report_numbers(reference)  # non-empty: the comparison above compared something
