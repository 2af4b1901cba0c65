"""The GPU check's preflight: a Python or torch that cannot work stops it in one line, before any install."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


preflight = _load("preflight")
wheelhouse = _load("build_wheelhouse")
CP311 = {"cp311-cp311-manylinux_2_28_x86_64", "py3-none-any"}


def _env(**changes) -> preflight.Environment:
    values = dict(python=(3, 11, 4), torch="2.14.1+cpu", torchvision="0.29.1", torchvision_requires=["torch==2.14.1"],
                  missing=["diffusers"])
    return preflight.Environment(**{**values, **changes})


def _wheels(tmp_path: Path, *wheels: tuple[str, str, tuple[str, ...]], python: str = "3.11",
            torch: str = "2.14.1") -> dict:
    """A wheelhouse folder of stub wheels (name, tag, requirements), read as the preflight reads one."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name, tag, requires in wheels:
        path = wheelhouse.write_stub_wheel(tmp_path, name, "1.0", requires)
        path.rename(path.with_name(path.name.replace("py3-none-any", tag)))
    (tmp_path / "wheelhouse.json").write_text(json.dumps({"python_version": python, "torch": torch}))
    return preflight.read_wheelhouse(tmp_path)


@pytest.mark.parametrize("changes, says", [
    ({"python": (3, 9, 18)}, "Python 3.9 is too old"),
    ({"torch": None}, "torch is not installed"),
    ({"torch": "2.1.0"}, "torch 2.1.0 is too old"),
    ({"torchvision_requires": ["torch==2.11.0"]}, "torchvision 0.29.1 needs torch==2.11.0"),
])
def test_a_python_or_torch_that_cannot_work_is_one_line(changes, says):
    with pytest.raises(preflight.Unfit, match=says):
        preflight.check(_env(**changes))
    assert preflight.check(_env()) == []


def test_a_wheelhouse_for_another_python_or_torch_is_refused(tmp_path):
    other_python = _wheels(tmp_path / "a", ("alpha", "cp312-cp312-manylinux_2_28_x86_64", ()),
                           ("beta", "py3-none-any", ()), python="3.12")
    with pytest.raises(preflight.Unfit, match=r"built for Python 3\.12, this is Python 3\.11: .*version 3\.11"):
        preflight.check(_env(), other_python, CP311)
    other_torch = _wheels(tmp_path / "b", ("beta", "py3-none-any", ()), torch="2.11.0")
    with pytest.raises(preflight.Unfit, match="built for torch 2.11.0, this machine has torch 2.14.1"):
        preflight.check(_env(), other_torch, CP311)
    with pytest.raises(preflight.Unfit, match="the wheelhouse is empty"):
        preflight.check(_env(), {"wheels": {}}, CP311)
    assert preflight.check(_env(missing=[]), other_python, CP311) == []  # nothing to install: nothing to check


def test_one_unfit_wheel_is_listed_not_fatal(tmp_path):
    found = _wheels(tmp_path, ("alpha", "cp311-cp311-manylinux_2_28_x86_64", ()),
                    ("greedy", "py3-none-any", ("torch>=3.0",)), ("odd", "cp312-cp312-manylinux_2_28_x86_64", ()))
    unfit = preflight.check(_env(), found, CP311)
    assert len(unfit) == 2 and unfit[0].startswith("greedy") and "needs torch>=3.0" in unfit[0]
    assert unfit[1].startswith("odd") and "cp312" in unfit[1]


def test_main_stops_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(preflight, "probe", lambda: _env(python=(3, 9, 1)))
    assert preflight.main(["--wheelhouse", str(tmp_path)]) == 2
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("preflight: python 3.9.1") and "missing: diffusers" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("preflight: STOP: Python 3.9 is too old")
    monkeypatch.setattr(preflight, "probe", lambda: _env(missing=[]))
    assert preflight.main([]) == 0
