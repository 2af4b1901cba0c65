"""An offline wheelhouse for the GPU check: what it needs beyond what the GPU machine already has.

A machine lent for a few minutes has torch but no network, so everything else travels with the repository
(clsp itself is the working tree, which ``gpu_bench.sh`` puts on the path).
The packages are clsp's own dependencies; those the target machine already holds (``target_packages.txt``,
its pip list) are left out, and those of its packages whose versions are known stand in for themselves while
pip resolves the rest for the target's Python and platform (stand-ins are local versions that exist on no
index and have no dependencies), so every wheel carried accepts the target's torch, torchvision, numpy and
Hugging Face hub. A plan that would still carry a torch or NVIDIA package is refused in one line, and so is a
wheelhouse over the size limit (what a run may carry is bounded).

FAISS: the target runs CUDA 13, and the GPU wheels on PyPI are CUDA 12 builds (``faiss-gpu-cu12``, and
``faiss-gpu`` 1.15, 135 MB, needs the CUDA 12 runtime packages), so ``faiss-gpu-cu<N>`` is tried for the
target's CUDA and, when it does not resolve without NVIDIA packages, ``faiss-cpu`` is carried instead (exact
search of CUDA tensors then runs in torch: ``clsp.train.neighbours``).

    python benchmarks/build_wheelhouse.py                  # .whl/ for the GPU machine: cp312, manylinux 2.28
    python benchmarks/build_wheelhouse.py --python-version 3.11 --torch 2.14.1 --torchvision 0.29.1 \
        --provided none --max-mib 400 --dest /tmp/whl-local  # this machine's equivalents, for the --cpu dry run
    pip install --no-index --no-deps --target SITE .whl/*.whl   # on the GPU machine (gpu_bench.sh does it)

Roots are pinned to the versions installed here where those fit the target, so the GPU runs what the tests
ran; where they do not, pip picks the newest that does (said in one line). ``wheelhouse.json`` in the
destination records the target and every wheel.
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

from clsp.io import write_json_atomic

TORCH = ("torch", "torchvision")
TARGET = {"python": "3.12", "torch": "2.11.0", "torchvision": "0.26.0", "cuda": "13"}  # the GPU machine
TARGET_PACKAGES = Path(__file__).resolve().parent / "target_packages.txt"
STAND_IN = "provided"  # local version label of the torch stand-in
FORBIDDEN = re.compile(r"^(torch.*|triton|nvidia-.*|cuda-.*|pytorch-.*)$")
GLIBC, ARCH = 28, "x86_64"  # torch's own wheels need glibc 2.28
MAX_MIB = 60.0
REPO = Path(__file__).resolve().parent.parent
FAISS_CPU = "faiss-cpu"


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


def clsp_roots() -> tuple[str, ...]:
    """clsp's own runtime dependencies (its installed metadata, so pyproject.toml is the one list), less torch."""
    names = [Requirement(text).name for text in metadata.requires("clsp") or []
             if Requirement(text).marker is None]
    return tuple(name for name in names if canonicalize_name(name) not in TORCH)


def read_provided(path: Path | None) -> dict[str, str | None]:
    """The target's packages, canonical name -> version (None where unknown), from a ``NAME[==VERSION]`` list."""
    if path is None:
        return {}
    provided: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            provided[canonicalize_name(name)] = version.strip() or None
    return provided


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
            index_args: list[str], torchvision_version: str = "0", provided: dict[str, str | None] | None = None
            ) -> list[dict]:
    """pip's resolution for the target, torch, torchvision and the target's packages of known version stood in
    for: ``[{name, version, requires}]``."""
    versions = {name: version for name, version in (provided or {}).items() if version and name not in TORCH}
    with tempfile.TemporaryDirectory() as tmp:
        stand_ins = Path(tmp) / "stand-ins"
        stand_ins.mkdir()
        torch_pin = f"{torch_version}+{STAND_IN}"
        write_stub_wheel(stand_ins, "torch", torch_pin)
        write_stub_wheel(stand_ins, "torchvision", f"{torchvision_version}+{STAND_IN}", (f"torch=={torch_pin}",))
        for name, version in versions.items():
            write_stub_wheel(stand_ins, name, f"{version}+{STAND_IN}")
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), "--target", str(Path(tmp) / "target"),
                   *target_options(python_version, platforms), "--find-links", str(stand_ins), *index_args,
                   f"torch=={torch_pin}", f"torchvision=={torchvision_version}+{STAND_IN}",
                   *(f"{name}=={version}+{STAND_IN}" for name, version in versions.items()),
                   *(r for r in requirements if canonicalize_name(Requirement(r).name) not in versions)]
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
    carry = [item for item in resolved if item["name"] not in provided and not item["version"].endswith(f"+{STAND_IN}")]
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
    parser.add_argument("--python-version", default=TARGET["python"], help="the target's Python")
    parser.add_argument("--platform", action="append",
                        help=f"pip platform tag (repeatable; default: manylinux up to glibc 2.{GLIBC}, {ARCH})")
    parser.add_argument("--torch", default=TARGET["torch"], help="torch version on the target")
    parser.add_argument("--torchvision", default=TARGET["torchvision"], help="torchvision version on the target")
    parser.add_argument("--cuda", default=TARGET["cuda"], help="the target's CUDA major version for faiss-gpu "
                        "('none': faiss-cpu)")
    parser.add_argument("--provided", default=str(TARGET_PACKAGES),
                        help="the target's packages, NAME[==VERSION] a line ('none': only torch and torchvision)")
    parser.add_argument("--package", action="append", help="root package (repeatable; default: clsp's dependencies)")
    parser.add_argument("--max-mib", type=float, default=MAX_MIB)
    parser.add_argument("--find-links", action="append", default=[], help="extra local wheel folder for pip")
    parser.add_argument("--no-index", action="store_true", help="resolve from --find-links only")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")
    args = parser.parse_args(argv)
    args.platform = args.platform or manylinux_platforms()
    return args


def plan_for(roots: tuple[str, ...], args: argparse.Namespace, index_args: list[str],
             provided: dict[str, str | None]) -> list[dict]:
    """The plan for ``roots``: pinned to this environment's versions where they fit the target, else the
    newest that do."""
    options = dict(python_version=args.python_version, platforms=args.platform, torch_version=args.torch,
                   torchvision_version=args.torchvision, index_args=index_args, provided=provided)
    leave_out = provided_by_torch() | set(provided)
    try:
        return plan(resolve(pinned(roots), **options), leave_out)
    except Refused as refusal:
        if str(refusal).startswith("refusing"):
            raise
        print(f"the versions installed here do not all fit the target ({refusal}); taking the newest that do")
        return plan(resolve(list(roots), **options), leave_out)


def with_faiss_for_cuda(roots: tuple[str, ...], args: argparse.Namespace, index_args: list[str],
                        provided: dict[str, str | None]) -> tuple[tuple[str, ...], list[dict]]:
    """The roots and plan with FAISS's GPU wheel for the target's CUDA where one resolves without NVIDIA
    packages, else with faiss-cpu (said in one line)."""
    if args.cuda != "none" and FAISS_CPU in roots:
        gpu = f"faiss-gpu-cu{args.cuda}"
        try:
            plan(resolve([gpu], python_version=args.python_version, platforms=args.platform,
                         torch_version=args.torch, torchvision_version=args.torchvision, index_args=index_args,
                         provided=provided), provided_by_torch() | set(provided))
            roots = tuple(gpu if root == FAISS_CPU else root for root in roots)
        except Refused as refusal:
            print(f"{gpu} does not fit the target ({str(refusal).rsplit(': ', 1)[-1]}): carrying {FAISS_CPU}; exact "
                  "search of CUDA tensors runs in torch")
    return roots, plan_for(roots, args, index_args, provided)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    index_args = [*(o for d in args.find_links for o in ("--find-links", str(d))), *(["--no-index"] * args.no_index)]
    provided = read_provided(None if args.provided == "none" else Path(args.provided))
    try:
        roots, carry = with_faiss_for_cuda(tuple(args.package or clsp_roots()), args, index_args, provided)
        print(f"{len(carry)} packages for Python {args.python_version} {args.platform[0]} "
              f"(torch {args.torch}, torchvision {args.torchvision} on the target):")
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
    write_json_atomic(args.dest / "wheelhouse.json", {
        "python_version": args.python_version, "platforms": args.platform, "torch": args.torch,
        "torchvision": args.torchvision, "cuda": args.cuda, "roots": list(roots), "total_bytes": total,
        "wheels": wheels})
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
