"""The seeded study: paired runs, intervals, the validation grid and its selection, controls, collapse marks,
the deterministic probe, and a resumable end-to-end run on tiny settings."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from clsp.datasets import get_dataset, validation_indices, validation_splits
from clsp.evaluate import features
from clsp.evaluate.linear import deterministic_probe
from clsp.study import (
    VALIDATION_PREFIX,
    arm_runs,
    collapse_marks,
    interval,
    parse_grid,
    select_cell,
    study,
    study_markdown,
    study_runs,
    summarise,
    validation_grid,
)
from clsp.train.data import open_shards, plan_epoch
from support import make_train_shards

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


def test_grid_is_the_cartesian_product_and_baselines_ignore_clsp_only_keys():
    cells = parse_grid(["train.clsp_lambda=0.3,1.0", "train.clsp_lambda_ramp_epochs=0,5", "train.warmup_epochs=1,5"])
    assert len(cells) == 8 and len({json.dumps(c, sort_keys=True) for c in cells}) == 8
    assert parse_grid([]) == []  # no --grid: no validation phase at all
    assert cells[0] == {"clsp_lambda": 0.3, "clsp_lambda_ramp_epochs": 0, "warmup_epochs": 1}
    runs = {}
    for cell in cells:
        runs.update(study_runs(["simclr"], [0, 1, 2], None, {"simclr": cell}, prefix=VALIDATION_PREFIX))
    clsp = [name for name in runs if "-clsp" in name]
    base = [name for name in runs if "-base" in name]
    assert len(clsp) == 8 * 3 and len(base) == 2 * 3  # one baseline per seed and warm-up, not per cell
    for name in base:
        assert runs[name]["clsp_lambda"] == 0.0 and "clsp_lambda_ramp_epochs" not in runs[name]
    # controls are their seed's CLSP run with another positive source, under the same cell
    per_arm = arm_runs("simclr", [0], 1.0, cells[-1], ("clsp", "baseline", "self", "oracle"))
    clsp_run = per_arm["clsp"][0][1]
    for control in ("self", "oracle"):
        assert per_arm[control][0][1] == {**clsp_run, "positive_source": control}


@pytest.mark.parametrize("grid, expected", [
    ("train.clsp_lamda=0.3,1.0", "unknown training setting (did you mean 'train.clsp_lambda'?)"),
    ("train.clsp_lambda=0.3,-1", "'train.clsp_lambda': input should be greater than or equal to 0"),
    ("train.method=simclr,moco", "compare methods with --methods"),
    ("generate.steps=2,4", "must look like train.KEY=V1,V2"),
    ("train.epochs=", "must look like train.KEY=V1,V2"),
    ("train.epochs=2,2", "a value is repeated"),
])
def test_grid_keys_and_values_are_refused_in_one_line(grid: str, expected: str):
    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--grid", grid])
    assert result.exit_code != 0 and result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and expected in lines[0], result.output


def test_controls_are_validated():
    result = CliRunner().invoke(study, [str(ROOT / "pipeline.yaml"), "--controls", "self,random"])
    assert result.exit_code != 0 and "Error: --controls" in result.output and "self, oracle" in result.output


def test_validation_split_is_stratified_fixed_and_never_reads_the_test_split(monkeypatch):
    digits = get_dataset("digits")
    fit, held = validation_indices(digits, 0.2)
    again_fit, again_held = validation_indices(get_dataset("digits"), 0.2)
    assert np.array_equal(held, again_held) and np.array_equal(fit, again_fit)  # fixed: not a run seed
    assert not set(fit) & set(held) and len(fit) + len(held) == len(digits)
    labels = digits.labels()
    for label in range(10):
        members = (labels == label).sum()
        assert (labels[held] == label).sum() == round(members * 0.2)  # stratified: 20 % of each label
    # the evaluations fit on the rest and score on the held-out images; the test split is never loaded
    monkeypatch.setattr(features, "test_split", lambda *a, **k: pytest.fail("the test split was read"))
    train, scored = features.labelled_splits("digits", "linear", root="data", download=False, image_size=None,
                                             validation=0.2)
    assert np.array_equal(scored.labels(), labels[held]) and np.array_equal(train.labels(), labels[fit])
    assert np.array_equal(scored.array([0, 1]), digits.array(held[:2]))
    assert len({train.fingerprint, scored.fingerprint, digits.fingerprint}) == 3  # separate feature caches
    assert validation_splits(digits, 0.2)[1].split == "train-validation0.2"
    assert not np.array_equal(validation_indices(digits, 0.3)[1][:20], held[:20])


def test_validation_runs_never_train_on_held_out_anchors(tmp_path: Path):
    from dataclasses import replace

    shards = open_shards(make_train_shards(tmp_path / "shards", num_anchors=120, shard_size=40))
    held = validation_indices(get_dataset("digits"), 0.2)[1]
    validation_run = replace(shards, held_out=frozenset(held.tolist()))
    covered_held = set(held.tolist()) & set(range(120))
    assert covered_held and validation_run.num_anchors == 120 - len(covered_held)
    for epoch in range(3):
        seen = np.concatenate(plan_epoch(validation_run, seed=0, epoch=epoch, batch_size=8).chunks)
        assert not set(seen.tolist()) & covered_held and len(seen) == (validation_run.num_anchors // 8) * 8
    full = np.concatenate(plan_epoch(shards, seed=0, epoch=0, batch_size=8).chunks)
    assert set(full.tolist()) & covered_held  # without held-out anchors the same plan uses them


def _write_results(eval_dir: Path, linear: float, knn: float, probe: float) -> None:
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "results.json").write_text(json.dumps({
        "linear": {"digits": {"top1": linear, "deterministic": {"top1": probe}}},
        "knn": {"digits": {"best_top1": knn}}}))


def test_selection_takes_each_arms_best_recipe_on_validation_and_never_reads_test_results(tmp_path: Path):
    cells = parse_grid(["train.clsp_lambda=0.3,1.0", "train.warmup_epochs=1,5"])
    # (0.3, 1), (0.3, 5), (1.0, 1), (1.0, 5). Without warm-up the baseline is broken (70 against 85), so the
    # largest CLSP - baseline difference (+12, cell 2) is not the best recipe: the best CLSP run with the
    # baseline's best settings is cell 3 (88).
    base = {1: 70.0, 5: 85.0}
    clsp = {0: 80.0, 1: 86.0, 2: 82.0, 3: 88.0}
    for i, cell in enumerate(cells):
        per_arm = arm_runs("simclr", [0, 1, 2], None, cell, ("clsp", "baseline"), VALIDATION_PREFIX)
        for seed, ((clsp_run, _), (base_run, _)) in enumerate(zip(per_arm["clsp"], per_arm["baseline"])):
            _write_results(tmp_path / "eval" / base_run, base[cell["warmup_epochs"]] + seed, 70.0, 75.0)
            _write_results(tmp_path / "eval" / clsp_run, clsp[i] + seed + 0.1 * seed, 70.0, 75.0)
        for name, _ in sum(arm_runs("simclr", [0, 1, 2], None, cell, ("clsp", "baseline")).values(), []):
            (tmp_path / "eval" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "eval" / name / "results.json").write_text("poisoned: not JSON {")  # test-split runs
    grid = validation_grid(tmp_path, ["simclr"], [0, 1, 2], None, cells)["simclr"]
    assert grid["selected"]["cell"] == 3 and grid["selected"]["settings"] == {"clsp_lambda": 1.0, "warmup_epochs": 5}
    assert grid["cells"][2]["summary"]["linear top-1"]["difference"]["mean"] == pytest.approx(12.0 + 0.1)
    assert grid["selected"]["clsp_linear"] == pytest.approx(89.1) and grid["selected"]["baseline_linear"] == 86.0
    assert "chosen by the baseline's validation accuracy" in grid["selected"]["notes"][0]
    summary = {"linear top-1": {"clsp": {"mean": 80.0}, "baseline": {"mean": 82.0},
                                "difference": {"mean": -2.0, "low": -3.0}}}
    better_clsp = {"linear top-1": {"clsp": {"mean": 81.0}, "baseline": {"mean": 82.0},
                                    "difference": {"mean": -1.0, "low": -1.5}}}
    hurting = select_cell([{"clsp_lambda": 0.3}, {"clsp_lambda": 1.0}], [summary, better_clsp])
    assert hurting["cell"] == 1 and "not above its baseline" in hurting["notes"][0]
    tied = {**better_clsp, "kNN top-1": {"clsp": {"mean": 90.0}, "baseline": {"mean": 80.0}}}
    tie = select_cell([{"clsp_lambda": 0.3}, {"clsp_lambda": 1.0}],
                      [{**better_clsp, "kNN top-1": {"clsp": {"mean": 85.0}}}, tied])
    assert tie["cell"] == 1


def test_controls_get_paired_differences_and_collapsed_runs_are_marked(tmp_path: Path):
    per_arm = arm_runs("simclr", [0, 1, 2], 1.0, {}, ("clsp", "baseline", "self", "oracle"))
    offsets = {"clsp": 3.0, "baseline": 0.0, "self": 1.0, "oracle": 5.0}
    for arm, runs in per_arm.items():
        for seed, (name, _) in enumerate(runs):
            _write_results(tmp_path / "eval" / name, 80.0 + seed + offsets[arm], 70.0 + offsets[arm], 75.0 + seed)
    collapsed_run, silent_run = per_arm["self"][1][0], per_arm["oracle"][0][0]
    for name, _ in sum(per_arm.values(), []):
        if name != silent_run:  # a run from before collapse was recorded: no "collapse" entry
            (tmp_path / "train" / name).mkdir(parents=True)
            (tmp_path / "train" / name / "train_summary.json").write_text(json.dumps(
                {"collapse": {"collapsed": name == collapsed_run, "epochs": []}}))
        else:
            (tmp_path / "train" / name).mkdir(parents=True)
            (tmp_path / "train" / name / "train_summary.json").write_text(json.dumps({"final": {}}))
    names = {arm: [name for name, _ in runs] for arm, runs in per_arm.items()}
    summary = summarise(tmp_path, names)
    linear = summary["linear top-1"]
    assert linear["difference"]["mean"] == pytest.approx(3.0) and linear["difference"]["half_width"] == 0.0
    assert linear["controls"]["self"]["mean"] == pytest.approx(2.0)
    assert linear["controls"]["oracle"]["mean"] == pytest.approx(-2.0)
    assert summary["deterministic probe top-1"]["difference"]["mean"] == 0.0
    assert linear["noise_floor"]["sd"] == pytest.approx(1.0) and linear["noise_floor"]["range"] == 2.0
    marks = collapse_marks(tmp_path, dict(sum(per_arm.values(), [])))
    assert marks[collapsed_run] is True and marks[silent_run] is None and marks[names["clsp"][0]] is False
    config = {"dataset": {"name": "digits"}, "train": {"clsp_lambda_study": 1.0, "epochs": 1, "backbone": "x"},
              "generate": {"candidates": 2, "interpolation": 0.1}, "evaluate": {"linear_epochs": 2}}
    text = study_markdown({"simclr": summary}, config, [0, 1, 2], "study.png", {"simclr": names}, marks)
    assert re.search(r"\| simclr \| linear top-1 \| self \| 82\.00 ± [\d.]+ \| \+2\.00 \[\+2\.00, \+2\.00\] \| "
                     r"CLSP better than self \|", text), text
    assert "CLSP worse than oracle" in text and "**self 1/3**" in text and collapsed_run in text
    assert "| simclr | linear top-1 | 1.00 | 80.00 - 82.00 (2.00) | 3 |" in text  # the noise floor


def test_nnclr_arms_get_the_support_set_accuracy_row_and_other_methods_do_not(tmp_path: Path):
    per_arm = arm_runs("nnclr", [0, 1], 0.3, {}, ("clsp", "baseline"))
    accuracy = {"clsp": [0.5, 0.6], "baseline": [0.7, 0.7]}
    for arm, runs in per_arm.items():
        for seed, (name, _) in enumerate(runs):
            _write_results(tmp_path / "eval" / name, 80.0, 70.0, 75.0)
            (tmp_path / "train" / name).mkdir(parents=True)
            (tmp_path / "train" / name / "train_summary.json").write_text(json.dumps(
                {"final": {"nn_acc": accuracy[arm][seed]}}))
    names = {arm: [name for name, _ in runs] for arm, runs in per_arm.items()}
    row = summarise(tmp_path, names)["support-set nn accuracy"]
    assert row["clsp"]["mean"] == pytest.approx(55.0) and row["baseline"]["mean"] == pytest.approx(70.0)
    assert row["difference"]["mean"] == pytest.approx(-15.0)
    simclr = arm_runs("simclr", [0, 1], 0.3, {}, ("clsp", "baseline"))
    for name, _ in sum(simclr.values(), []):
        _write_results(tmp_path / "eval" / name, 80.0, 70.0, 75.0)
    assert "support-set nn accuracy" not in summarise(tmp_path, {a: [n for n, _ in r] for a, r in simclr.items()})


def test_deterministic_probe_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 3
    labels = rng.integers(0, 4, size=200)
    x = centres[labels] + rng.normal(size=(200, 16))
    first = deterministic_probe(x[:150], labels[:150], x[150:], labels[150:])
    second = deterministic_probe(x[:150].copy(), labels[:150].copy(), x[150:].copy(), labels[150:].copy())
    assert first == second and first["top1"] > 80.0 and first["converged"]
    assert first["name"] == "deterministic probe (standardised logistic regression)"


@pytest.mark.slow
def test_tiny_grid_study_selects_on_validation_then_measures_on_test(tmp_path: Path):
    args = [str(ROOT / "pipeline.yaml"), "--seeds", "3", "--grid-seeds", "2", "--methods", "simclr", "--grid",
            "train.clsp_lambda=0.3,1.0", "--controls", "self", "--validation", "0.2",
            "--set", f"run_dir={tmp_path / 'run'}", "--set", "generate.limit=96", "--set", "generate.steps=2",
            "--set", "generate.candidates=2", "--set", "train.epochs=1", "--set", "train.batch_size=32",
            "--set", "train.clsp_lambda_ramp_epochs=0", "--set", "train.warmup_epochs=1",
            "--set", "evaluate.linear_epochs=2"]
    first = CliRunner().invoke(study, args)
    assert first.exit_code == 0, first.output
    out = tmp_path / "run" / "study"
    record = json.loads((out / "study.json").read_text())
    grid = record["grid"]["methods"]["simclr"]
    assert len(grid["cells"]) == 2 and record["selected"]["simclr"] == grid["selected"]["settings"]
    assert record["grid"]["seeds"] == [0, 1]
    for cell in grid["cells"]:  # validation runs: scored on the held-out images, trained without them
        assert len(cell["runs"]["clsp"]) == len(cell["runs"]["baseline"]) == 2  # --grid-seeds, not --seeds
        for name in sum(cell["runs"].values(), []):
            results = json.loads((out / "eval" / name / "results.json").read_text())
            assert results["linear"]["digits"]["split"] == "train-validation0.2"
            assert json.loads((out / "train" / name / "train_summary.json").read_text())["anchors"] < 96
    summary = record["summary"]["simclr"]
    for label in ("linear top-1", "deterministic probe top-1", "kNN top-1"):
        per_seed = summary[label]["per_seed"]
        assert len(per_seed["clsp"]) == len(per_seed["baseline"]) == len(per_seed["self"]) == 3
        assert summary[label]["controls"]["self"]["mean"] == pytest.approx(
            sum(c - s for c, s in zip(per_seed["clsp"], per_seed["self"])) / 3)
    test_runs = [name for name in record["runs"] if not name.startswith(VALIDATION_PREFIX)]
    assert len(test_runs) == 9
    for name in test_runs:
        assert json.loads((out / "eval" / name / "results.json").read_text())["linear"]["digits"]["split"] == "test"
    text = (out / "study.md").read_text()
    assert "## Validation grid" in text and "**selected**" in text and "## Controls" in text
    assert "## Noise floor" in text and (out / "study.png").stat().st_size > 0
    again = CliRunner().invoke(study, args)  # everything recorded: nothing is trained again
    assert again.exit_code == 0 and again.output.count("ran nothing") == 2, again.output
