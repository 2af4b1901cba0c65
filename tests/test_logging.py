"""A batch job's log (no terminal) gets a line per epoch; a bug is told apart from bad input."""

from __future__ import annotations

import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
from click.testing import CliRunner

from clsp.cli import main
from clsp.train import trainer
from support import make_train_shards, tiny

EPOCH_LINE = re.compile(r"clsp\.train\.trainer: epoch (\d+)/3: loss \d+\.\d{4}, loss_base \d+\.\d{4}, "
                        r"loss_clsp \d+\.\d{4}, lr [0-9.e-]+, \d+\.\d img/s, ETA \S+$")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_train_shards(tmp_path_factory.mktemp("log-shards"), num_anchors=16, shard_size=16)


@pytest.mark.slow
def test_clsp_train_writing_to_a_file_logs_one_line_per_epoch(shards, tmp_path, cli_env):
    log = tmp_path / "clsp-train.out"
    with log.open("w") as out:  # as Slurm's --output: stdout and stderr into one file, no terminal
        done = subprocess.run([str(Path(sys.executable).parent / "clsp-train"), "--shards", str(shards), "--out",
                               str(tmp_path / "run"), "--epochs", "3", *tiny("simclr")],
                              env=cli_env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    lines = log.read_text().splitlines()
    assert done.returncode == 0, lines
    epochs = [int(match.group(1)) for match in map(EPOCH_LINE.search, lines) if match]
    assert epochs == [1, 2, 3], lines
    assert lines[-1].startswith("trained simclr"), lines


def _fails_inside(job):
    raise KeyError("no_such_key")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_an_internal_error_keeps_its_traceback_when_debugging(how, monkeypatch, tmp_path):
    monkeypatch.setattr(trainer, "train", _fails_inside)
    args = ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "run")]
    if how == "env":
        monkeypatch.setenv("CLSP_DEBUG", "1")
    else:
        monkeypatch.delenv("CLSP_DEBUG", raising=False)
        args = ["--verbose", *args]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, KeyError) and result.exit_code == 1
    assert "_fails_inside" in "".join(traceback.format_exception(*result.exc_info))


def test_an_internal_error_is_one_line_that_says_it_is_a_bug(monkeypatch, tmp_path):
    monkeypatch.delenv("CLSP_DEBUG", raising=False)
    monkeypatch.setattr(trainer, "train", _fails_inside)
    result = CliRunner().invoke(main, ["train", "--shards", str(tmp_path), "--out", str(tmp_path / "run")])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: internal error") and "KeyError: 'no_such_key'" in lines[0], lines
    assert "CLSP_DEBUG=1" in lines[0]


def test_bad_input_stays_one_line_and_debugging_shows_where_it_was_raised(monkeypatch, tmp_path):
    args = ["train", "--shards", str(tmp_path / "none"), "--out", str(tmp_path / "run")]
    monkeypatch.delenv("CLSP_DEBUG", raising=False)
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 1 and plain.stderr.startswith("Error: no manifest.json"), plain.output
    monkeypatch.setenv("CLSP_DEBUG", "1")
    debugged = CliRunner().invoke(main, args)
    assert type(debugged.exception).__name__ == "UserError" and "no manifest.json" in str(debugged.exception)
