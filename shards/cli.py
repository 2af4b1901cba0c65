"""``clsp shards info|verify|preview``: look at a shard directory without writing code."""

from __future__ import annotations

from pathlib import Path

import click

from clsp.config import click_options, parse
from clsp.datasets import DEFAULT_DATA_ROOT
from clsp.errors import Group, UserError
from clsp.shards.import_npy import ImportJob

_DIR = click.argument("directory")  # a local path or a URL: not a click.Path, which would mangle "s3://"


def _size(num_bytes: int) -> str:
    value, unit = float(num_bytes), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            break
        value /= 1000
    return f"{num_bytes} ({value:.1f} {unit})"


@click.group(cls=Group, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
def shards() -> None:
    """Inspect, verify and preview a shard directory written by clsp-gen (a local path, or a URL: s3://,
    gs://, http(s)://), or import the authors' synthetic positives into one."""


@shards.command()
@_DIR
def info(directory: str) -> None:
    """Summarise DIRECTORY: dataset, settings, progress and size."""
    from clsp.shards.reader import read_manifest

    manifest = read_manifest(directory)
    data, records = manifest.dataset, list(manifest.shards.values())
    candidates = sorted({r.candidates for r in records})
    rows = [
        ("directory", str(directory)),
        ("dataset", f"{data.name} / {data.split}: {data.size} images of "
                    f"{data.image_size}x{data.image_size}, {data.num_classes} classes"),
        ("fingerprint", data.fingerprint),
        ("schema", str(manifest.schema_version)),
        ("generation", " ".join(f"{k}={v}" for k, v in sorted(manifest.generation.items())) or "-"),
        ("shards", f"{len(records)} of {manifest.num_shards} done ({manifest.shard_size} anchors each)"),
        ("anchors", f"{sum(r.samples for r in records)} of {manifest.num_anchors}"),
        ("candidates", ", ".join(map(str, candidates)) + " per anchor" if candidates else "-"),
        ("bytes", _size(sum(r.bytes for r in records))),
    ]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@shards.command()
@_DIR
def verify(directory: str) -> None:
    """Check every shard of DIRECTORY against its manifest; exit 1 listing what is wrong.

    Finds missing, truncated and altered shards, undecodable samples, and anchors that are duplicated,
    missing or in the wrong shard.
    """
    from clsp.shards.reader import read_manifest
    from clsp.shards.verify import verify_shards

    problems = verify_shards(directory)
    for problem in problems:
        click.echo(f"  - {problem}")
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {directory}; regenerate the shards listed with clsp-gen")
    manifest = read_manifest(directory)
    click.echo(f"OK: {len(manifest.shards)} shards, {manifest.num_anchors} anchors in {directory} "
               f"match the manifest")


@shards.command()
@_DIR
@click.option("--out", "out_png", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG to write.")
@click.option("--num-anchors", default=8, type=click.IntRange(1, 1024), help="Rows: the first N anchors.")
@click.option("--data-root", default=DEFAULT_DATA_ROOT, type=click.Path(file_okay=False),
              help="Where the real dataset lives (used only when the shards do not store anchors).")
def preview(directory: str, out_png: Path, num_anchors: int, data_root: str) -> None:
    """Write a PNG of anchors (left column) beside their synthetic positives."""
    from clsp.io import write_bytes_atomic
    from clsp.shards.preview import preview_png
    from clsp.shards.reader import ShardDirectory, load_dataset

    store = ShardDirectory.open(directory)
    first = next(store.samples())
    dataset = None if first.anchor is not None else load_dataset(store.manifest, data_root)
    write_bytes_atomic(out_png, preview_png(store, num_anchors, dataset))
    click.echo(f"wrote {out_png}")


@shards.command("import")
@click.argument("file")
@click_options(ImportJob, exclude=("file", "split"))
def import_(file: str, **options) -> None:
    """Write the authors' synthetic set FILE (.npy, uint8 [N, k, H, W, 3], row i = training image i) as a
    verified shard directory that clsp-train reads.

    The file is memory-mapped, never loaded whole; a rerun resumes.
    """
    from clsp.shards.import_npy import import_npy

    import_npy(parse(ImportJob, {"file": file, **options}), echo=click.echo)
