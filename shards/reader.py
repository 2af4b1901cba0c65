"""Reading a shard directory: its manifest, decoded samples, and the WebDataset training pipeline.

Decoding goes through ``schema.decode_sample`` only (JSON and PNG); WebDataset's own ``decode()``
is deliberately not used because its default handlers unpickle ``.pyd`` / ``.pickle`` members.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import webdataset as wds

from clsp.errors import UserError
from clsp.runtime import progress
from clsp.shards import schema

MANIFEST = "manifest.json"
_REQUIRED = ("dataset", "generation", "num_anchors", "shard_size", "shards")


def read_manifest(directory: str | os.PathLike) -> dict:
    """The directory's manifest; UserError when there is none or it is of a newer schema."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"no manifest.json in {directory}: it is not a shard directory, or generation has "
                        f"not started; run clsp-gen first")
    try:
        manifest = json.loads(path.read_text())
        version = int(manifest["schema_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a clsp shard manifest ({type(err).__name__}: {err}); "
                        f"regenerate the shards with clsp-gen") from None
    if version > schema.SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {version}, newer than this clsp understands "
                        f"({schema.SCHEMA_VERSION}); upgrade clsp")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise UserError(f"{path} is not a clsp shard manifest (it lacks {', '.join(missing)}); "
                        f"regenerate the shards with clsp-gen")
    return manifest


def recorded_shards(manifest: dict) -> list[int]:
    """Indices of the shards the manifest records as finished, in order."""
    return sorted(int(record["index"]) for record in manifest["shards"].values())


def shard_urls(directory: str | os.PathLike, shard_indices: list[int] | None = None) -> list[str]:
    """Paths of the finished shards (all, or the given indices), in shard order."""
    manifest = read_manifest(directory)
    done = recorded_shards(manifest)
    if not done:
        raise UserError(f"no finished shards in {directory} yet; run clsp-gen (or wait for its first shard)")
    wanted = done if shard_indices is None else sorted(shard_indices)
    unfinished = sorted(set(wanted) - set(done))
    if unfinished:
        raise UserError(f"shards {unfinished} are not finished in {directory}; run clsp-gen to complete them")
    return [str(Path(directory) / schema.shard_name(i)) for i in wanted]


def raw_samples(urls: list[str], *, shuffle_shards: bool = False, seed: int = 0, split_by_node: bool = False,
                split_by_worker: bool = False,
                select_files: Callable[[str], bool] | None = schema.is_readable_member) -> wds.WebDataset:
    """Undecoded samples (member suffix -> bytes). ``select_files=None`` keeps every member (for verify)."""
    return wds.WebDataset(
        urls,
        shardshuffle=len(urls) if shuffle_shards else False,
        detshuffle=True,  # seeded, and a new order each time the pipeline is iterated again
        seed=seed,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker if split_by_worker else None,
        select_files=select_files,
        empty_check=False,  # a worker may get no shard when there are fewer shards than workers
    )


def iter_samples(directory: str | os.PathLike, shard_indices: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Decoded samples of the finished shards, in shard order; never unpickles anything.

    Each is ``{"anchor_index", "label", "seed", "positives": uint8 [k,H,W,3], "anchor": uint8 [H,W,3] or None}``
    plus WebDataset's ``"__key__"``.
    """
    try:
        yield from raw_samples(shard_urls(directory, shard_indices)).map(schema.decode_sample)
    except (ValueError, tarfile.TarError, OSError) as err:
        raise UserError(f"missing or damaged shard in {directory} ({str(err).split(' @ ')[0]}); "
                        f"run `clsp shards verify {directory}` and regenerate what it lists") from None


def shard_pipeline(directory: str | os.PathLike, *, shuffle_shards: bool = True, shuffle_buffer: int = 1000,
                   seed: int = 0, split_by_node: bool = True, split_by_worker: bool = True) -> wds.WebDataset:
    """A WebDataset pipeline over the finished shards yielding the same dicts as ``iter_samples``.

    Shards are split by rank (``torch.distributed`` or ``RANK``/``WORLD_SIZE``) and by DataLoader
    worker, then shuffled; samples are shuffled in a buffer of ``shuffle_buffer``. Both shuffles are
    seeded: pass ``seed + epoch`` for a fresh, reproducible order each epoch.
    """
    pipeline = raw_samples(shard_urls(directory), shuffle_shards=shuffle_shards, seed=seed,
                           split_by_node=split_by_node, split_by_worker=split_by_worker)
    return pipeline.map(schema.decode_sample).shuffle(shuffle_buffer, seed=seed)


def load_positives(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All finished samples in memory: anchor indices ``[N]`` (ascending) and positives uint8 ``[N, k, H, W, 3]``."""
    manifest = read_manifest(directory)
    total = sum(int(record["samples"]) for record in manifest["shards"].values())
    indices = np.empty(total, dtype=np.int64)
    positives: np.ndarray | None = None
    count = 0
    samples = progress(iter_samples(directory), total=total, desc="load positives", unit="anchor")
    for count, sample in enumerate(samples, start=1):
        if positives is None:
            positives = np.empty((total, *sample["positives"].shape), dtype=np.uint8)
        if count > total or sample["positives"].shape != positives.shape[1:]:
            raise UserError(f"shards in {directory} disagree with their manifest (sample count or positive "
                            f"shape); run `clsp shards verify {directory}`")
        indices[count - 1] = sample["anchor_index"]
        positives[count - 1] = sample["positives"]
    if positives is None or count != total:
        raise UserError(f"shards in {directory} hold {count} samples but the manifest records {total}; "
                        f"run `clsp shards verify {directory}`")
    if np.any(np.diff(indices) < 0):
        order = np.argsort(indices, kind="stable")
        indices, positives = indices[order], positives[order]
    return indices, positives


def load_dataset(manifest: dict, data_root: str | os.PathLike = "data"):
    """The real dataset the shards were made from, refusing data whose fingerprint differs."""
    from clsp.datasets import get_dataset

    info = manifest["dataset"]
    dataset = get_dataset(info["name"], split=info["split"], root=data_root, image_size=info.get("image_size"))
    if dataset.fingerprint != info["fingerprint"]:
        raise UserError(f"{info['name']} ({info['split']}) under {data_root} has fingerprint {dataset.fingerprint}, "
                        f"but the shards were made from {info['fingerprint']}; point --data-root at that data")
    return dataset
