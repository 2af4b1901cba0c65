"""Reading a shard directory: its validated manifest, its geometry, and the samples of verified shards.

A ``ShardDirectory`` is the directory's one parsed manifest. A shard is read only after its size and
sha256 match the manifest, and then as an uncompressed tar stream whose member sizes are checked from
their headers before any byte is read; samples are checked and decoded by ``schema`` (JSON and PNG
only), so no member is ever unpickled and no malformed shard gives a partial result.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clsp.errors import ShardError, UserError
from clsp.io import file_digest
from clsp.shards import schema

MANIFEST = "manifest.json"
_REGENERATE = "run `clsp shards verify` on the directory and regenerate what it lists with clsp-gen"
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # WebDataset's split: key up to the basename's first dot
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def read_manifest(directory: str | os.PathLike) -> schema.Manifest:
    """The directory's validated manifest; ShardError when there is none or it is malformed."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UserError(f"no manifest.json in {directory}: it is not a shard directory, or generation has "
                        f"not started; run clsp-gen first")
    return schema.parse_json(schema.Manifest, read_bounded(path, schema.MAX_MANIFEST_BYTES),
                             limit=schema.MAX_MANIFEST_BYTES, where=path, what="the shard manifest",
                             fix="regenerate the shards with clsp-gen")


def read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a file: enough for ``parse_json`` to refuse an oversized one unread."""
    with open(path, "rb") as f:
        return f.read(limit + 1)


def _refuse_compressed(head: bytes, path: Path) -> None:
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ShardError(f"shard is {kind}-compressed ({path}): shards are plain tar files; "
                             f"regenerate it with clsp-gen")


def tar_samples(path: Path, shape: tuple[int, int]) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """(key, readable members by suffix, names of members left unread) per sample, in tar order.

    The tar is read as an uncompressed stream; a readable member larger than its limit (from the tar
    header) is refused before it is read, and every other member is skipped unread.
    """
    with open(path, "rb") as stream:
        _refuse_compressed(stream.read(8), path)
        stream.seek(0)
        key, members, unread = None, {}, []
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    match = _MEMBER.match(info.name)
                    if match is None:
                        raise ShardError(f"member {info.name[:80]!r} is not named <key>.<suffix> ({path}): "
                                         f"{_REGENERATE}")
                    if match[1] != key:
                        if key is not None:
                            yield key, members, unread
                        key, members, unread = match[1], {}, []
                    suffix = match[2]
                    if not info.isfile() or not schema.is_readable_member(f".{suffix}"):
                        unread.append(suffix)
                        continue
                    if info.size > schema.member_limit(suffix, shape):
                        raise ShardError(f"member {info.name} is {info.size} bytes, over the limit of "
                                         f"{schema.member_limit(suffix, shape)} ({path}): {_REGENERATE}")
                    members[suffix] = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, ValueError) as err:
            if isinstance(err, ShardError):
                raise
            raise ShardError(f"truncated or not a valid tar, {str(err)[:200]} ({path}): {_REGENERATE}") from None
        if key is not None:
            yield key, members, unread


@dataclass(frozen=True)
class ShardDirectory:
    """A shard directory and its one validated manifest: geometry, records and verified reading."""

    path: Path
    manifest: schema.Manifest

    @classmethod
    def open(cls, directory: str | os.PathLike) -> ShardDirectory:
        return cls(Path(directory), read_manifest(directory))

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def anchor_range(self, shard_index: int) -> range:
        return self.manifest.anchor_range(shard_index)

    def shard_path(self, shard_index: int) -> Path:
        return self.path / schema.shard_name(shard_index)

    def record(self, shard_index: int) -> schema.ShardRecord:
        """The manifest's record of a finished shard; ShardError when the shard is not finished."""
        record = self.manifest.shards.get(schema.shard_name(shard_index))
        if record is None:
            raise ShardError(f"shard {shard_index} is not finished ({self.shard_path(shard_index)}): "
                             f"run clsp-gen to complete it")
        return record

    def check_shard(self, shard_index: int) -> schema.ShardRecord:
        """The shard's record, after its file's size and sha256 match it; ShardError naming the file if not."""
        record, path = self.record(shard_index), self.shard_path(shard_index)
        if not path.is_file():
            raise ShardError(f"shard is missing, the manifest records it ({path}): {_REGENERATE}")
        size, sha256 = file_digest(path)
        if size != record.bytes or sha256 != record.sha256:
            what = f"{size} bytes, the manifest records {record.bytes}" if size != record.bytes else "sha256 differs"
            raise ShardError(f"shard is damaged or altered, {what} ({path}): {_REGENERATE}")
        return record

    def check_shards(self, limit: int | None = None) -> None:
        """Check the files a read of the first ``limit`` anchors (all: None) will open, before any work on
        them; a ShardError names the first damaged one."""
        for index in self.manifest.recorded:
            if limit is None or self.anchor_range(index).start < limit:
                self.check_shard(index)

    def verified_shards(self) -> set[int]:
        """Recorded shards whose file matches its record's size and sha256 (the ones a reader will read)."""
        done = set()
        for index in self.manifest.recorded:
            try:
                self.check_shard(index)
            except (ShardError, OSError):
                continue
            done.add(index)
        return done

    def read_records(self, shard_index: int) -> Iterator[tuple[str, schema.SampleRecord, dict[str, bytes]]]:
        """(key, checked record, undecoded members) per sample of one verified shard: exactly its anchors,
        in order, or a ShardError naming it. Callers decode the PNG members they need with
        ``schema.decode_member``."""
        record = self.check_shard(shard_index)
        path, anchors = self.shard_path(shard_index), self.anchor_range(shard_index)
        count = 0
        for key, members, _ in tar_samples(path, self.manifest.image_shape):
            sample = schema.check_sample(key, members, candidates=record.candidates, where=path)
            if count >= len(anchors) or sample.anchor_index != anchors[count]:
                want = anchors[count] if count < len(anchors) else "none"
                raise ShardError(f"shard holds anchor {sample.anchor_index} where its range "
                                 f"{anchors.start}-{anchors.stop - 1} has {want} ({path}): {_REGENERATE}")
            count += 1
            yield key, sample, members
        if count != len(anchors):
            raise ShardError(f"shard holds {count} of its {len(anchors)} anchors ({path}): {_REGENERATE}")

    def read_shard(self, shard_index: int) -> Iterator[schema.ShardSample]:
        """The samples of one verified shard: exactly its anchors, in order, or a ShardError naming it."""
        path, shape = self.shard_path(shard_index), self.manifest.image_shape
        for key, record, members in self.read_records(shard_index):
            yield schema.sample_from(key, record, members, shape=shape, where=path)

    def samples(self, shard_indices: list[int] | None = None) -> Iterator[schema.ShardSample]:
        """Samples of the given finished shards (default: all recorded), in shard order, each verified first."""
        wanted = self.manifest.recorded if shard_indices is None else sorted(shard_indices)
        if not wanted:
            raise UserError(f"no finished shards in {self.path} yet; run clsp-gen (or wait for its first shard)")
        for index in wanted:
            yield from self.read_shard(index)


def load_dataset(manifest: schema.Manifest, data_root: str | os.PathLike = "data"):
    """The real dataset the shards were made from, refusing other data or a manifest that claims more."""
    from clsp.datasets import get_dataset

    info = manifest.dataset
    dataset = get_dataset(info.name, split=info.split, root=data_root, image_size=info.image_size)
    if dataset.fingerprint != info.fingerprint:
        raise UserError(f"{info.name} ({info.split}) under {data_root} has fingerprint {dataset.fingerprint}, "
                        f"but the shards were made from {info.fingerprint}; point --data-root at that data")
    if manifest.num_anchors > len(dataset) or dataset.image_size != info.image_size:
        raise ShardError(f"the shard manifest claims {manifest.num_anchors} anchors of {info.image_size} pixels, "
                         f"{info.name} ({info.split}) has {len(dataset)} of {dataset.image_size} "
                         f"({data_root}): regenerate the shards with clsp-gen")
    return dataset
