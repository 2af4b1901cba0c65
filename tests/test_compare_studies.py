"""Arms of different studies paired per seed (benchmarks/compare_studies.py), on two tiny study files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from scipy.stats import ttest_rel

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_studies.py"
spec = importlib.util.spec_from_file_location("compare_studies", SCRIPT)
compare_studies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_studies)


def _study(path: Path, method: str, seeds: list[int], per_seed: dict[str, list[float]]) -> str:
    summary = {method: {"linear top-1": {"per_seed": per_seed}}}
    path.write_text(json.dumps({"seeds": seeds, "summary": summary}))
    return str(path)


def test_arms_pair_on_the_seeds_they_share(tmp_path):
    a = _study(tmp_path / "a.json", "simclr", [0, 1, 2, 3], {"baseline": [90.0, 91.0, 89.0, 80.0]})
    b = _study(tmp_path / "b.json", "supcon", [0, 1, 2], {"baseline": [93.0, 92.5, 92.0]})
    out = tmp_path / "cmp" / "out.json"
    result = CliRunner().invoke(compare_studies.main, ["--against", "simclr", "--arm", f"simclr={a}:simclr:baseline",
                                                       "--arm", f"supcon={b}:supcon:baseline", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["seeds"] == [0, 1, 2]  # seed 3 has no partner
    row = report["metrics"]["linear top-1"]["supcon"]
    assert row["difference"]["mean"] == pytest.approx((3.0 + 1.5 + 3.0) / 3)
    assert row["arm"]["mean"] == pytest.approx(92.5)
    # the interval is the paired t-interval: zero lies outside it exactly when the paired t-test rejects at 5 %
    rejects = ttest_rel([93.0, 92.5, 92.0], [90.0, 91.0, 89.0]).pvalue < 0.05
    assert (row["difference"]["low"] > 0) == rejects
    assert "| linear top-1 | supcon | 92.50" in result.output
    assert not list(out.parent.glob(".*.tmp"))


def test_an_unknown_reference_is_one_line(tmp_path):
    a = _study(tmp_path / "a.json", "simclr", [0, 1], {"baseline": [90.0, 91.0]})
    result = CliRunner().invoke(compare_studies.main, ["--against", "nope", "--arm", f"simclr={a}:simclr:baseline",
                                                       "--out", str(tmp_path / "o.json")])
    assert result.exit_code == 2 and "'nope' is not one of the arms (simclr)" in result.output
    assert not (tmp_path / "o.json").exists()
