"""A small offline wheelhouse for the GPU benchmarks: what they need beyond torch, and clsp itself.

A machine lent for a few minutes has torch but no network, so everything else has to travel with the
repository. The benchmarks need only these packages (scikit-learn, matplotlib and TensorBoard are
imported where they are used, never by the generation or training step; timm is NNCLR's LARS). Their
dependencies are resolved by pip for the target Python and platform while a stand-in for torch (a local
version that exists on no index, with no dependencies) stands for the machine's own torch; packages that
torch and torchvision already install there are left out. A plan that would still carry a torch or
NVIDIA package is refused in one line, and so is a wheelhouse over the size limit (what a run may
carry is bounded).

    python benchmarks/build_wheelhouse.py                       # .whl/ for this Python, manylinux 2.28 x86_64
    python benchmarks/build_wheelhouse.py --python-version 3.12 --dest .whl
    pip install --no-index --no-deps --target SITE .whl/*.whl   # on the GPU machine (gpu_bench.sh does it)

Roots installed in this environment are pinned to the versions installed here, so the GPU runs what
the tests ran. ``wheelhouse.json`` in the destination lists every wheel.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# timm only for LARS, NNCLR's default optimizer (2.5 MB, nothing beyond what the others pull)
ROOTS = ("diffusers", "accelerate", "webdataset", "faiss-cpu", "kornia", "safetensors", "click", "pyyaml", "pydantic",
         "timm")
TORCH = ("torch", "torchvision")
STAND_IN = "provided"  # local version label of the torch stand-in
FORBIDDEN = re.compile(r"^(torch.*|triton|nvidia-.*|cuda-.*|pytorch-.*)$")
GLIBC, ARCH = 28, "x86_64"  # torch's own wheels need glibc 2.28
MAX_MIB = 60.0
REPO = Path(__file__).resolve().parent.parent


class Refused(Exception):
    """The wheelhouse cannot be built as asked; the message is the one line to print."""


def write_stub_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel with only metadata (the torch stand-in; fake packages in tests)."""
    dist = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    path = directory / f"{dist}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])
    files = {f"{dist}.dist-info/METADATA": meta,
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: clsp\nRoot-Is-Purelib: true\n"
                                         "Tag: py3-none-any\n"}
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def provided_by_torch(names: tuple[str, ...] = TORCH) -> set[str]:
    """Canonical names torch and torchvision install, from this environment's metadata (same platform)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def pinned(roots: tuple[str, ...]) -> list[str]:
    """Each root at the version installed here, or unpinned when it is not installed."""
    out = []
    for root in roots:
        try:
            out.append(f"{root}=={metadata.version(root)}")
        except metadata.PackageNotFoundError:
            out.append(root)
    return out


def manylinux_platforms(glibc_minor: int = GLIBC, arch: str = ARCH) -> list[str]:
    """Every manylinux tag a glibc 2.<minor> machine runs (this pip does not expand a tag to older ones)."""
    aliases = (("2014", 17), ("2010", 12), ("1", 5))
    legacy = [f"manylinux{name}_{arch}" for name, minor in aliases if minor <= glibc_minor]
    return [f"manylinux_2_{m}_{arch}" for m in range(glibc_minor, 4, -1)] + legacy


def target_options(python_version: str, platforms: list[str]) -> list[str]:
    return ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
            *(option for p in platforms for option in ("--platform", p))]


def resolve(requirements: list[str], *, python_version: str, platforms: list[str], torch_version: str,
            index_args: list[str]) -> list[dict]:
    """pip's resolution for the target, torch and torchvision stood in for: ``[{name, version, requires}]``."""
    with tempfile.TemporaryDirectory() as tmp:
        stand_ins = Path(tmp) / "stand-ins"
        stand_ins.mkdir()
        torch_pin = f"{torch_version}+{STAND_IN}"
        write_stub_wheel(stand_ins, "torch", torch_pin)
        write_stub_wheel(stand_ins, "torchvision", f"0+{STAND_IN}", (f"torch=={torch_pin}",))
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "--target", str(Path(tmp) / "target"),
                   *target_options(python_version, platforms), "--find-links", str(stand_ins), *index_args,
                   f"torch=={torch_pin}", f"torchvision==0+{STAND_IN}", *requirements]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            raise Refused(f"pip cannot resolve {' '.join(requirements)} for Python {python_version} "
                          f"{platforms[0]}: {(errors or ['see pip'])[-1]}")
        items = json.loads(report.read_text())["install"]
    return [{"name": canonicalize_name(i["metadata"]["name"]), "version": i["metadata"]["version"],
             "requires": i["metadata"].get("requires_dist", [])} for i in items]


def plan(resolved: list[dict], provided: set[str]) -> list[dict]:
    """What the wheelhouse carries: the resolution less the stand-ins and what torch installs.

    Raises Refused when that would still include a torch or NVIDIA package, naming who pulls it.
    """
    carry = [item for item in resolved if item["name"] not in provided
             and not (item["name"] in TORCH and item["version"].endswith(f"+{STAND_IN}"))]
    forbidden = sorted(item["name"] for item in carry if FORBIDDEN.match(item["name"]))
    if forbidden:
        pullers = sorted({item["name"] for item in resolved for text in item["requires"]
                          if canonicalize_name(Requirement(text).name) in forbidden})
        raise Refused(f"refusing: the wheelhouse would carry {', '.join(forbidden)} (required by "
                      f"{', '.join(pullers) or 'the package list'}); torch and NVIDIA packages stay on the machine")
    return sorted(carry, key=lambda item: item["name"])


def download(carry: list[dict], dest: Path, *, python_version: str, platforms: list[str],
             index_args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
                    *target_options(python_version, platforms), *index_args,
                    *(f"{item['name']}=={item['version']}" for item in carry)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dest),
                    str(REPO)], check=True)


def check_size(dest: Path, max_mib: float) -> list[dict]:
    """The wheels with their sizes; Refused when they add up to more than ``max_mib``."""
    wheels = sorted(({"file": p.name, "bytes": p.stat().st_size} for p in dest.glob("*.whl")),
                    key=lambda w: -w["bytes"])
    total = sum(w["bytes"] for w in wheels) / 2**20
    if total > max_mib:
        largest = ", ".join(f"{w['file'].split('-')[0]} {w['bytes'] / 2**20:.1f}" for w in wheels[:3])
        raise Refused(f"refusing: the wheelhouse is {total:.1f} MiB, over the {max_mib:g} MiB limit "
                      f"(largest, MiB: {largest})")
    return wheels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    parser.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}")
    parser.add_argument("--platform", action="append",
                        help=f"pip platform tag (repeatable; default: manylinux up to glibc 2.{GLIBC}, {ARCH})")
    parser.add_argument("--torch", default=None, help="torch version on the target (default: this environment's)")
    parser.add_argument("--package", action="append", help=f"root package (repeatable; default {' '.join(ROOTS)})")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    parser.add_argument("--find-links", action="append", default=[], help="extra local wheel folder for pip")
    parser.add_argument("--no-index", action="store_true", help="resolve from --find-links only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    args = parser.parse_args(argv)
    args.platform = args.platform or manylinux_platforms()
    args.torch = args.torch or metadata.version("torch").split("+")[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    index_args = [*(o for d in args.find_links for o in ("--find-links", str(d))), *(["--no-index"] * args.no_index)]
    roots = tuple(args.package or ROOTS)
    try:
        carry = plan(resolve(pinned(roots), python_version=args.python_version, platforms=args.platform,
                             torch_version=args.torch, index_args=index_args), provided_by_torch())
        print(f"{len(carry)} packages for Python {args.python_version} {args.platform[0]} "
              f"(torch {args.torch} on the target):")
        print("  " + " ".join(f"{item['name']}=={item['version']}" for item in carry))
        if args.dry_run:
            return 0
        args.dest.mkdir(parents=True, exist_ok=True)
        for old in args.dest.glob("*.whl"):
            old.unlink()
        download(carry, args.dest, python_version=args.python_version, platforms=args.platform, index_args=index_args)
        wheels = check_size(args.dest, args.max_mib)
    except Refused as refusal:
        print(refusal, file=sys.stderr)
        return 2
    total = sum(w["bytes"] for w in wheels)
    (args.dest / "wheelhouse.json").write_text(json.dumps({
        "python_version": args.python_version, "platforms": args.platform, "torch": args.torch, "roots": list(roots),
        "total_bytes": total, "wheels": wheels}, indent=2) + "\n")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
