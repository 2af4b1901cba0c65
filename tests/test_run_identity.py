"""A run's identity (its fingerprint, the records it keeps) is the same on any machine for the same
configuration, and changes when a setting that shapes the result changes; what the machine resolves
(``auto`` precision and augmentation) is checked on resume instead."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from clsp import runtime
from clsp.config import identity
from clsp.pipeline import Pipeline, load_config
from clsp.train.config import TrainJob
from clsp.train.trainer import run_settings

ROOT = Path(__file__).resolve().parents[1]
# (usable cores, CUDA present, CPU with bf16 units)
MACHINES = [(1, False, False), (8, False, True), (1, True, False), (8, True, True)]


def _machine(patch: pytest.MonkeyPatch, cores: int, cuda: bool, bf16: bool) -> None:
    patch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    patch.setattr(torch.cuda, "is_available", lambda: cuda)
    patch.setattr(runtime, "cpu_supports_bf16", lambda: bf16)


def _config_with_machine_defaults(tmp_path: Path) -> Path:
    """The repository's pipeline.yaml with the training settings whose defaults depend on the machine unset."""
    config = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    for key in ("workers", "augment", "precision"):
        config["train"].pop(key, None)
    config["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_identity_and_the_fingerprints_are_the_same_on_every_machine(monkeypatch, tmp_path):
    config = _config_with_machine_defaults(tmp_path)
    identities, prints, workers = set(), set(), set()
    for machine in MACHINES:
        with monkeypatch.context() as patch:
            _machine(patch, *machine)
            job = TrainJob(method="moco", shards="s", out="o").resolved("digits")
            workers.add(job.workers)
            identities.add(json.dumps(identity(job), sort_keys=True))
            prints.add(json.dumps(Pipeline(load_config(config)).fingerprints(), sort_keys=True))
    assert workers == {1, 4}  # the machines did differ, and the default followed them
    assert len(identities) == 1 and len(prints) == 1


@pytest.mark.parametrize("name, value", [("precision", "bf16"), ("precision", "fp32"), ("augment", "device"),
                                         ("augment", "cpu"), ("epochs", 17), ("queue_size", 64)])
def test_a_changed_result_setting_changes_the_identity(name: str, value: object):
    job = TrainJob(method="moco", shards="s", out="o").resolved("digits")
    changed = job.replace(**{name: value})
    assert identity(changed) != identity(job) and identity(changed)[name] == value
    assert identity(job.replace(workers=0 if job.workers else 1)) == identity(job)  # a speed setting


def test_what_auto_resolves_to_on_the_machine_is_what_a_resume_checks(monkeypatch):
    job = TrainJob(shards="s", out="o").resolved("digits")
    seen = {}
    for bf16 in (False, True):
        with monkeypatch.context() as patch:
            _machine(patch, 4, False, bf16)
            seen[bf16] = run_settings(job, torch.device("cpu"))
    assert (seen[False]["precision"], seen[True]["precision"]) == ("fp32", "bf16")
    assert seen[False]["augment"] == "cpu"
    on_gpu = run_settings(job, torch.device("cuda"))
    assert (on_gpu["precision"], on_gpu["augment"]) == ("bf16", "device")
    explicit = job.replace(precision="fp32", augment="cpu")
    assert run_settings(explicit, torch.device("cuda"))["augment"] == "cpu"
    # asked for explicitly, what auto gives on this machine resumes: the numerics are the same
    assert run_settings(explicit, torch.device("cpu")) == seen[False]
