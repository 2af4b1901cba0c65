"""Can this machine run the GPU check? Python, torch, torchvision, CUDA, the card and what is missing, in seconds.

The GPU check has a few minutes on a machine it cannot change (no network): a Python or torch that the
wheelhouse was not built for would fail in the middle of the install or at the first import, after the
machine's start has been paid for. This prints the environment and stops with one line naming what cannot
work and how to fix it, before anything is installed:

    python benchmarks/preflight.py --wheelhouse .whl            # before the install
    python benchmarks/preflight.py --imports                    # after it: every package the check uses imports

Exit status 0: the check can run (missing packages are listed, and the wheelhouse is expected to bring them);
2: it cannot, and the last line says why.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import json
import platform
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # a machine with torch alone: pip's own copy (the install needs pip anyway)
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.tags import sys_tags  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]
    from pip._vendor.packaging.version import Version  # type: ignore[no-redef]

MIN_PYTHON = (3, 10)  # pyproject's requires-python
MIN_TORCH = Version("2.4")  # pyproject's torch>=2.4
# what the check imports beyond torch: module -> distribution (a missing one is installed from the wheelhouse)
NEEDED = {"clsp": "clsp", "diffusers": "diffusers", "accelerate": "accelerate", "webdataset": "webdataset",
          "pydantic": "pydantic", "faiss": "faiss-cpu", "safetensors": "safetensors", "click": "click",
          "yaml": "pyyaml", "timm": "timm", "tensorboard": "tensorboard", "sklearn": "scikit-learn",
          "matplotlib": "matplotlib", "PIL": "pillow"}


class Unfit(Exception):
    """The environment cannot run the check; the message is the one line to print."""


@dataclass
class Environment:
    """What the check depends on, as read from this process (tests build one by hand)."""

    python: tuple[int, int, int]
    torch: str | None
    torchvision: str | None
    torchvision_requires: list[str] = field(default_factory=list)
    cuda: str | None = None
    card: str | None = None
    missing: list[str] = field(default_factory=list)


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def probe() -> Environment:
    """This interpreter's environment; torch is imported (a second or two) only to ask about CUDA and the card."""
    python = sys.version_info[:3]
    env = Environment(python=(python[0], python[1], python[2]), torch=_version("torch"),
                      torchvision=_version("torchvision"),
                      torchvision_requires=metadata.requires("torchvision") or [] if _version("torchvision") else [],
                      missing=[module for module in NEEDED if importlib.util.find_spec(module) is None])
    if env.torch is not None:
        import torch

        env.cuda = torch.version.cuda
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.card = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    return env


def read_wheelhouse(wheelhouse: Path) -> dict:
    """The wheelhouse's record (``wheelhouse.json``: the Python and torch it was built for; {} when absent)
    and, per wheel, its tags and its torch and torchvision requirements (from the wheel's own metadata)."""
    record_path = wheelhouse / "wheelhouse.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    wheels = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            meta = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = archive.read(meta).decode() if meta else ""
        requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
        wheels[wheel.name] = {"tags": sorted(str(t) for t in parse_wheel_filename(wheel.name)[3]),
                              "requires": [r for r in requires if _applies(Requirement(r))]}
    return {**record, "wheels": wheels}


def _applies(req: Requirement) -> bool:
    return canonicalize_name(req.name) in ("torch", "torchvision") and (
        req.marker is None or req.marker.evaluate({"extra": ""}))


def check(env: Environment, wheelhouse: dict | None = None, supported: set[str] | None = None) -> list[str]:
    """Raise Unfit with one line when ``env`` cannot run the check; otherwise the wheels of ``wheelhouse``
    (from ``read_wheelhouse``) that will not install here, each with why (the install skips them).

    ``supported``: the wheel tags this interpreter takes (default: packaging's ``sys_tags``)."""
    python = ".".join(map(str, env.python[:2]))
    if env.python[:2] < MIN_PYTHON:
        raise Unfit(f"Python {python} is too old: clsp needs {'.'.join(map(str, MIN_PYTHON))} or newer")
    if env.torch is None or env.torchvision is None:
        raise Unfit(f"{'torch' if env.torch is None else 'torchvision'} is not installed for this Python: the check "
                    "uses the machine's own; run it with the python that has torch (PYTHON=...)")
    versions = {"torch": Version(env.torch.split("+")[0]), "torchvision": Version(env.torchvision.split("+")[0])}
    if versions["torch"] < MIN_TORCH:
        raise Unfit(f"torch {env.torch} is too old: clsp needs torch {MIN_TORCH} or newer")
    for text in env.torchvision_requires:
        req = Requirement(text)
        if canonicalize_name(req.name) == "torch" and not req.specifier.contains(versions["torch"], True):
            raise Unfit(f"torchvision {env.torchvision} needs {req}, but torch is {env.torch}: install the "
                        "torchvision built for this torch")
    if not env.missing or wheelhouse is None:
        return []
    wheels = wheelhouse.get("wheels", {})
    if not wheels:
        raise Unfit(f"missing {', '.join(NEEDED[m] for m in env.missing)} and the wheelhouse is empty: run python "
                    "benchmarks/build_wheelhouse.py where pip works, and bring .whl/ along")
    built_for = wheelhouse.get("torch")
    if built_for and Version(built_for).release[:2] != versions["torch"].release[:2]:
        raise Unfit(f"the wheelhouse was built for torch {built_for}, this machine has torch {env.torch}: rebuild "
                    f"it with python benchmarks/build_wheelhouse.py --torch {versions['torch']}")
    built_for_python = wheelhouse.get("python_version")
    if built_for_python and built_for_python != python:
        raise Unfit(f"the wheelhouse is built for Python {built_for_python}, this is Python {python}: rebuild it "
                    f"with python benchmarks/build_wheelhouse.py --python-version {python}")
    supported = supported if supported is not None else {str(tag) for tag in sys_tags()}
    unfit = {name: f"built for {', '.join(w['tags'])}" for name, w in wheels.items() if not set(w["tags"]) & supported}
    for name, wheel in wheels.items():
        for text in wheel["requires"]:
            req = Requirement(text)
            have = versions[canonicalize_name(req.name)]
            if name not in unfit and not req.specifier.contains(have, True):
                unfit[name] = f"needs {req}, this machine has {req.name} {have}"
    return sorted(f"{name}: {why}" for name, why in unfit.items())


def describe(env: Environment) -> str:
    """One line a person reads first in a log."""
    return (f"python {'.'.join(map(str, env.python))} ({platform.machine()}), torch {env.torch}, torchvision "
            f"{env.torchvision}, CUDA {env.cuda or 'none'}, card: {env.card or 'none'}; missing: "
            f"{', '.join(NEEDED[m] for m in env.missing) or 'nothing'}")


def import_check() -> list[str]:
    """The modules of ``NEEDED`` that fail to import, each with its error (after the install)."""
    failed = []
    for module in (*NEEDED, "clsp.train.trainer", "clsp.generate.sampler"):
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure is one line of the report, not a traceback
            failed.append(f"{module} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", type=Path, default=None, help="wheel folder the missing packages come from")
    parser.add_argument("--imports", action="store_true", help="import every package the check uses")
    args = parser.parse_args(argv)
    try:
        env = probe()
        print(f"preflight: {describe(env)}", flush=True)
        if args.imports:
            failed = import_check()
            # faiss only serves the search row; everything else needs its packages
            fatal = [f for f in failed if not f.startswith("faiss")]
            if failed:
                print(f"preflight: cannot import {'; '.join(failed)}", flush=True)
            if fatal:
                raise Unfit(f"the check cannot run without {fatal[0].split()[0]}: add it to the wheelhouse")
            return 0
        for line in check(env, read_wheelhouse(args.wheelhouse) if args.wheelhouse else None):
            print(f"preflight: will not install: {line}", flush=True)
    except Unfit as unfit:
        print(f"preflight: STOP: {unfit}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
