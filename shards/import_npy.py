"""Import the authors' synthetic-positive sets (METHOD.md section 3) as a verified shard directory.

Their sets are one ``.npy`` of uint8 ``[N, k, H, W, 3]`` whose row i holds the k positives of training image i.
The file is memory-mapped and read one shard's rows at a time (the CIFAR-10 set is 1.2 GB), written through the
same shard writer as ``clsp-gen``, and verified, so ``clsp-train --shards DIR`` trains on exactly those
positives. The manifest's generation record names the source file and its sha256; a rerun resumes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from clsp.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, DatasetConfig, same_setting, setting
from clsp.errors import UserError
from clsp.generate.config import GenerateJob


class ImportJob(DatasetConfig):
    """``clsp shards import``: one authors' ``.npy`` into a shard directory for a dataset's training split."""

    name: str = same_setting(GenerateJob, "name")
    file: str = setting(..., "The authors' synthetic set: uint8 [N, k, H, W, 3], row i = training image i.",
                        cli_exclude=True, min_length=1)
    shards: str = setting(..., "Output shard directory or URL; a rerun resumes it.", min_length=1)
    shard_size: int = same_setting(GenerateJob, "shard_size")
    limit: int | None = same_setting(GenerateJob, "limit")
    overwrite: bool = same_setting(GenerateJob, "overwrite")


def open_positives(path: str | Path) -> np.ndarray:
    """The file as a read-only memory map, refused in one line unless it is a regular file (a FIFO or a device
    would block or never end) holding uint8 ``[N, k, H, W, 3]`` with k within the shard schema's bound."""
    from clsp.shards.schema import MAX_CANDIDATES

    if not Path(path).exists():
        raise UserError(f"{path} not found; pass the authors' .npy file of positives")
    if not Path(path).is_file():
        raise UserError(f"{path} is not a regular file (a directory, a named pipe or a device); pass the .npy file "
                        f"itself, copied to disk")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as err:  # pickled objects, a bad header, an empty file, not a .npy at all
        raise UserError(f"cannot read {path} as a .npy array: {' '.join(str(err).split()) or 'it is empty'}") from None
    if not isinstance(array, np.ndarray):
        raise UserError(f"{path} is an .npz archive; pass the .npy array of positives itself")
    if array.dtype != np.uint8 or array.ndim != 5 or array.shape[-1] != 3 or array.shape[1] < 1:
        raise UserError(f"{path} holds {array.dtype} {list(array.shape)}; the authors' sets are uint8 "
                        f"[N, k, H, W, 3] (row i = the k positives of training image i)")
    if array.shape[1] > MAX_CANDIDATES:
        raise UserError(f"{path} holds {array.shape[1]} positives per image; a shard holds at most {MAX_CANDIDATES}: "
                        f"import the first {MAX_CANDIDATES} (np.save a copy of array[:, :{MAX_CANDIDATES}])")
    return array


def check_fits(array: np.ndarray, path: str | Path, describe: dict) -> None:
    """Refuse a set whose row count or image size differs from the dataset's training split."""
    n, _, height, width, _ = array.shape
    if n != describe["size"]:
        raise UserError(f"{path} has {n} rows but {describe['name']}/{describe['split']} has {describe['size']} "
                        f"images; the row count must equal the training split's (row i = image i)")
    size = describe["image_size"]
    if (height, width) != (size, size):
        resizable = height == width and MIN_IMAGE_SIZE <= height <= MAX_IMAGE_SIZE  # else --image-size cannot help
        resize = f" (or pass --image-size {height})" if resizable else ""
        raise UserError(f"{path} holds {height}x{width} images but {describe['name']}'s are {size}x{size}; "
                        f"import it for the dataset it was made from{resize}")


def import_npy(job: ImportJob, echo: Callable[[str], object] = print) -> dict:
    """Write (or finish) the shard directory of ``job.file``; verify it; return a summary."""
    from clsp.datasets import get_dataset
    from clsp.io import file_digest
    from clsp.runtime import progress
    from clsp.shards import schema, verify, writer
    from clsp.shards.store import ShardStore

    store = ShardStore.open(job.shards)  # a bad URL or missing credentials: before any work
    store.require_writable()
    store.probe()
    array = open_positives(job.file)
    dataset = get_dataset(job.name, root=job.data_root, image_size=job.image_size)
    identity = dataset.describe()
    check_fits(array, job.file, identity)
    size, sha256 = file_digest(job.file)
    n, k = array.shape[:2]
    num_anchors = min(job.limit or n, n)
    generation = {"source": "imported", "file": Path(job.file).name, "bytes": size, "sha256": sha256,
                  "candidates": k, "scores": False, "limit": job.limit}
    manifest = writer.init_manifest(job.shards, dataset=identity, generation=generation, num_anchors=num_anchors,
                                    shard_size=job.shard_size, overwrite=job.overwrite)
    done = writer.completed_shards(job.shards)
    labels = dataset.labels()
    todo = [i for i in range(manifest.num_shards) if i not in done]
    with progress(total=sum(len(manifest.anchor_range(i)) for i in todo), desc="import", unit="anchor") as bar:
        for index in todo:
            anchors = manifest.anchor_range(index)
            rows = np.array(array[anchors.start:anchors.stop])  # one shard's rows leave the memory map
            writer.write_shard(job.shards, index, (
                schema.ShardSample(anchor_index=a, positives=rows[a - anchors.start], label=int(labels[a]))
                for a in anchors))
            bar.update(len(anchors))
    problems = verify.verify_shards(job.shards)
    if problems:
        raise UserError(f"{len(problems)} problems in {job.shards} after the import (first: {problems[0]}); rerun "
                        "the same command to rewrite the damaged shards")
    echo(f"imported {num_anchors} anchors x {k} positives from {job.file} into {manifest.num_shards} shards in "
         f"{job.shards} ({len(done)} already complete); verify: no problems")
    return {"num_anchors": num_anchors, "candidates": k, "shards_written": len(todo), "shards_skipped": len(done)}
