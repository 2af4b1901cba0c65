"""The wheelhouse builder's plan and refusals, resolved by pip against a fake local index (no network)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "build_wheelhouse", Path(__file__).resolve().parent.parent / "benchmarks" / "build_wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(wheelhouse)

FAKE = {  # name: requirements; filelock is something torch installs on the target
    "alpha": ("beta>=1", "filelock"), "beta": (), "gamma": ("torch>=2.0",), "filelock": (),
    "evil": ("nvidia-cublas-cu12",), "nvidia-cublas-cu12": (), "greedy": ("torchaudio",), "torchaudio": ("torch",),
    "old": ("torch==1.0",), "needs-new-beta": ("beta>=2",),
}


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("fake-index")
    for name, requires in FAKE.items():
        wheelhouse.write_stub_wheel(folder, name, "1.0", requires)
    return ["--no-index", "--find-links", str(folder)]


def _plan(index: list[str], *roots: str) -> list[str]:
    resolved = wheelhouse.resolve(list(roots), python_version="3.11", platforms=wheelhouse.manylinux_platforms(),
                                  torch_version="2.14.1", index_args=index)
    return [item["name"] for item in wheelhouse.plan(resolved, wheelhouse.provided_by_torch())]


@pytest.mark.slow
def test_plan_keeps_dependencies_and_leaves_out_torch_and_what_it_installs(index):
    assert "filelock" in wheelhouse.provided_by_torch()
    assert _plan(index, "alpha", "gamma") == ["alpha", "beta", "gamma"]


@pytest.mark.slow
@pytest.mark.parametrize("root, carried", [("evil", "nvidia-cublas-cu12"), ("greedy", "torchaudio")])
def test_refuses_a_package_that_pulls_torch_or_nvidia_packages(index, root, carried):
    with pytest.raises(wheelhouse.Refused, match=rf"carry {carried} \(required by {root}\)"):
        _plan(index, "beta", root)


@pytest.mark.slow
def test_refuses_a_package_that_needs_another_torch(index):
    with pytest.raises(wheelhouse.Refused, match="pip cannot resolve"):
        _plan(index, "old")


@pytest.mark.slow
def test_main_says_one_line_and_fails_on_refusal(index, capsys):
    assert wheelhouse.main(["--dry-run", "--package", "gamma", "--torch", "2.14.1", *index[:1],
                            "--find-links", index[2]]) == 0
    assert "gamma==1.0" in capsys.readouterr().out
    assert wheelhouse.main(["--dry-run", "--package", "evil", "--torch", "2.14.1", *index[:1],
                            "--find-links", index[2]]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_size_limit(tmp_path: Path):
    wheelhouse.write_stub_wheel(tmp_path, "alpha", "1.0")
    assert [w["file"] for w in wheelhouse.check_size(tmp_path, 1.0)] == ["alpha-1.0-py3-none-any.whl"]
    with pytest.raises(wheelhouse.Refused, match="over the 1e-06 MiB limit"):
        wheelhouse.check_size(tmp_path, 1e-6)


def test_manylinux_platforms_reach_down_to_older_tags():
    tags = wheelhouse.manylinux_platforms(28, "x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)


@pytest.mark.slow
def test_the_targets_packages_are_left_out_and_stand_in_at_their_versions(index, tmp_path):
    listing = tmp_path / "target.txt"
    listing.write_text("# the target's pip list\nbeta==1.0\nfilelock\n")
    provided = wheelhouse.read_provided(listing)
    assert provided == {"beta": "1.0", "filelock": None}
    resolved = wheelhouse.resolve(["alpha"], python_version="3.11", platforms=wheelhouse.manylinux_platforms(),
                                  torch_version="2.14.1", index_args=index, provided=provided)
    assert [item["name"] for item in wheelhouse.plan(resolved, set(provided))] == ["alpha"]
    with pytest.raises(wheelhouse.Refused, match="pip cannot resolve"):  # beta 1.0 is what the target has
        wheelhouse.resolve(["needs-new-beta"], python_version="3.11", platforms=wheelhouse.manylinux_platforms(),
                           torch_version="2.14.1", index_args=index, provided=provided)
