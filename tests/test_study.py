"""The seeded study: paired runs, Student-t intervals, and a resumable end-to-end run on tiny settings."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from clsp.study import interval, study, study_runs

ROOT = Path(__file__).resolve().parents[1]


def test_interval_is_the_student_t_interval_of_the_mean():
    stat = interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["n"] == 3
    assert stat["half_width"] == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    assert (stat["low"], stat["high"]) == pytest.approx((2.0 - stat["half_width"], 2.0 + stat["half_width"]))
    assert interval([5.0, 5.0])["half_width"] == 0.0


def test_runs_are_paired_by_seed_and_differ_only_in_lambda():
    runs = study_runs(["simclr", "moco"], [0, 1], 0.3)
    assert len(runs) == 8
    for method in ("simclr", "moco"):
        for seed in (0, 1):
            clsp, base = runs[f"{method}-s{seed}-clsp"], runs[f"{method}-s{seed}-base"]
            assert clsp == {"method": method, "seed": seed, "clsp_lambda": 0.3}
            assert base == {**clsp, "clsp_lambda": 0.0}


@pytest.mark.slow
def test_tiny_study_runs_end_to_end_and_resumes(tmp_path: Path):
    args = [str(ROOT / "pipeline.yaml"), "--seeds", "2", "--methods", "simclr", "--clsp-lambda", "0.3",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "generate.limit=64", "--set", "generate.steps=2",
            "--set", "generate.candidates=2", "--set", "train.epochs=1", "--set", "train.batch_size=32",
            "--set", "evaluate.linear_epochs=2"]
    first = CliRunner().invoke(study, args)
    assert first.exit_code == 0, first.output
    out = tmp_path / "run" / "study"
    summary = json.loads((out / "study.json").read_text())["summary"]["simclr"]
    for label in ("linear top-1", "kNN top-1"):
        per_seed = summary[label]["per_seed"]
        assert len(per_seed["clsp"]) == len(per_seed["baseline"]) == 2
        diffs = [c - b for c, b in zip(per_seed["clsp"], per_seed["baseline"])]
        assert summary[label]["difference"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert "| simclr | linear top-1 |" in (out / "study.md").read_text() and (out / "study.png").stat().st_size > 0
    again = CliRunner().invoke(study, args)  # everything recorded: nothing is trained again
    assert again.exit_code == 0 and re.search(r"ran: nothing", again.output), again.output
