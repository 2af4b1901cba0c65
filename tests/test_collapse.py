"""Collapse is seen and said: the measure, a run made to collapse on purpose, and a healthy one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from clsp.evaluate.cli import main as evaluate
from clsp.evaluate.report import write_report
from clsp.io import load_torch
from clsp.train.cli import train
from clsp.train.collapse import COLLAPSE_THRESHOLD, CollapseMonitor, nt_xent_at_collapse, std_of_l2_normalized
from clsp.train.losses import nt_xent
from support import make_train_shards

BATCH = 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("collapse-shards"), num_anchors=64, shard_size=16)


def run_args(shard_dir: Path, out: Path, *extra: str) -> list[str]:
    """Two epochs of SimCLR on 64 digits, batch 16, narrow backbone, 32-d projections."""
    return ["--shards", str(shard_dir), "--out", str(out), "--method", "simclr", "--backbone", "resnet-narrow",
            "--batch-size", str(BATCH), "--workers", "0", "--precision", "fp32", "--proj-hidden-dim", "64",
            "--proj-output-dim", "32", "--epochs", "2", *extra]


# An extra view of the anchor itself pulled in at lambda 20 from the first step, with no warm-up: the
# alignment term swamps NT-Xent and every projection lands on the same point within two epochs.
COLLAPSING = ("--positive-source", "self", "--clsp-lambda", "20", "--warmup-epochs", "0", "--lr", "0.1")
# The baseline at a gentle learning rate: eight steps leave the projections about as spread as at the start.
HEALTHY = ("--clsp-lambda", "0", "--warmup-epochs", "1", "--lr", "0.02")


def collapse_warnings(output: str) -> list[str]:
    """The logged warning lines about collapse in a command's output (stdout and stderr)."""
    return [line for line in output.splitlines() if " W clsp.train.trainer: " in line and "collapse" in line]


def test_std_of_l2_normalized_is_zero_at_collapse_and_one_over_sqrt_d_when_spread():
    torch.manual_seed(0)
    same = torch.randn(1, 64).repeat(32, 1) * torch.rand(32, 1) * 5  # one direction, different lengths
    assert std_of_l2_normalized(same).item() == pytest.approx(0.0, abs=1e-6)
    for d in (16, 128):
        spread = std_of_l2_normalized(torch.randn(4096, d)).item()
        assert spread == pytest.approx(1 / math.sqrt(d), rel=0.05)
    # a common offset shrinks it: nearly identical projections sit between the two
    near = std_of_l2_normalized(torch.randn(4096, 32) + 8.0).item()
    assert 0 < near * math.sqrt(32) < 0.2


def test_nt_xent_of_identical_projections_is_log_2b_minus_1():
    z = torch.randn(1, 32).repeat(BATCH, 1)
    assert nt_xent(z, z.clone(), 0.2).item() == pytest.approx(nt_xent_at_collapse(BATCH)) == math.log(2 * BATCH - 1)


def test_monitor_flags_epochs_below_the_threshold_and_the_run_by_its_last_epoch():
    d = 25
    low, high = 0.5 * COLLAPSE_THRESHOLD / math.sqrt(d), 0.5 / math.sqrt(d)
    monitor = CollapseMonitor(d, loss_at_collapse=None)
    assert [monitor.observe(v) for v in (high, low, high)] == [False, True, False]
    record = monitor.record()
    assert record["epochs"] == [2] and record["collapsed"] is False  # collapsed and recovered
    assert monitor.observe(low) and monitor.record()["collapsed"] is True and monitor.record()["epochs"] == [2, 4]
    assert record["loss_at_collapse"] is None and record["threshold"] == COLLAPSE_THRESHOLD
    assert CollapseMonitor(d).record()["collapsed"] is False  # no epoch yet


def test_a_run_made_to_collapse_is_warned_recorded_and_reported(shard_dir, tmp_path):
    runs = {"collapsing": tmp_path / "collapsing", "healthy": tmp_path / "healthy"}
    summaries, warnings = {}, {}
    for label, extra in (("collapsing", COLLAPSING), ("healthy", HEALTHY)):
        result = CliRunner().invoke(train, run_args(shard_dir, runs[label], *extra))
        assert result.exit_code == 0, result.output
        summaries[label] = json.loads((runs[label] / "train_summary.json").read_text())["collapse"]
        warnings[label] = collapse_warnings(result.output)

    record = summaries["collapsing"]
    assert record["collapsed"] is True and 2 in record["epochs"] and len(record["z_std"]) == 2
    assert record["z_std"][-1] * math.sqrt(32) < record["threshold"] == COLLAPSE_THRESHOLD
    assert record["loss_at_collapse"] == pytest.approx(math.log(2 * BATCH - 1))
    assert len(warnings["collapsing"]) == len(record["epochs"])  # one line per collapsed epoch
    line = warnings["collapsing"][-1]
    assert str(runs["collapsing"]) in line and "epoch 2 sits at collapse" in line
    assert f"{record['z_std'][-1]:.4g}" in line and f"log(2B - 1) = {math.log(2 * BATCH - 1):.4f}" in line

    healthy = summaries["healthy"]
    assert healthy["collapsed"] is False and healthy["epochs"] == [] and not warnings["healthy"]
    assert all(v * math.sqrt(32) > 2 * COLLAPSE_THRESHOLD for v in healthy["z_std"])

    # the record survives a resume: a rerun finds the finished checkpoint and rewrites the same summary
    assert load_torch(runs["collapsing"] / "checkpoint.pt")["collapse_z_std"] == record["z_std"]
    again = CliRunner().invoke(train, run_args(shard_dir, runs["collapsing"], *COLLAPSING))
    assert again.exit_code == 0, again.output
    assert json.loads((runs["collapsing"] / "train_summary.json").read_text())["collapse"] == record

    # report.md flags the collapsed run, not the healthy one
    evals = {label: tmp_path / f"eval-{label}" for label in runs}
    for label, run in runs.items():
        result = CliRunner().invoke(evaluate, ["knn", "--encoder", str(run), "--dataset", "digits", "--k", "5",
                                               "--out", str(evals[label]), "--cache-dir", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
    report = write_report(evals, tmp_path / "report.md", dataset="digits").read_text()
    epochs = ", ".join(map(str, record["epochs"]))
    assert f"collapsing: COLLAPSED at epochs {epochs}" in report
    assert "healthy: COLLAPSED" not in report and "healthy: sat at collapse" not in report


def test_stop_on_collapse_ends_the_run_with_one_error_line(shard_dir, tmp_path):
    out = tmp_path / "stopped"
    result = CliRunner().invoke(train, run_args(shard_dir, out, *COLLAPSING, "--stop-on-collapse"))
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "sits at collapse" in errors[0] and "--stop-on-collapse" in errors[0], result.output
    assert "Traceback" not in result.output
    assert not (out / "encoder.safetensors").exists() and not (out / "train_summary.json").exists()
