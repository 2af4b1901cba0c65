"""Reading a shard directory: its validated manifest, its geometry, and the samples of verified shards.

A ``ShardDirectory`` is the directory's one parsed manifest, wherever the directory is (a local path or a
URL, see ``store``). On an object store, where several writers cannot update one file safely, the
per-shard records are the source of truth: the manifest's settings are merged with the records found.
A shard is read only after its size and sha256 match its record (one download serves both), and then as
an uncompressed tar stream whose member sizes are checked from their headers before any byte is read;
samples are decoded by ``schema.decode_sample`` (JSON and PNG only), so no member is ever unpickled and no
malformed shard gives a partial result.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from pydantic import ValidationError

from clsp.errors import ShardError, UserError
from clsp.io import file_digest
from clsp.shards import schema
from clsp.shards.store import ShardStore

MANIFEST = "manifest.json"
_REGENERATE = "run `clsp shards verify` on the directory and regenerate what it lists with clsp-gen"
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # WebDataset's split: key up to the basename's first dot
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
Location = str | os.PathLike | ShardStore


def read_manifest_file(directory: Location) -> schema.Manifest:
    """``manifest.json`` as stored (on an object store without the shards its records add); ShardError or
    UserError when there is none or it is malformed."""
    store = ShardStore.open(directory)
    if not store.exists(MANIFEST):
        raise UserError(f"no manifest.json in {store.location}: it is not a shard directory, or generation has "
                        f"not started; run clsp-gen first")
    return schema.parse_json(schema.Manifest, store.read_bounded(MANIFEST, schema.MAX_MANIFEST_BYTES),
                             limit=schema.MAX_MANIFEST_BYTES, where=store.where(MANIFEST),
                             what="the shard manifest", fix="regenerate the shards with clsp-gen")


def read_manifest(directory: Location) -> schema.Manifest:
    """The directory's validated manifest with every finished shard; ShardError when it is malformed."""
    store = ShardStore.open(directory)
    manifest = read_manifest_file(store)
    return manifest if store.local else _with_records(store, manifest)


def _with_records(store: ShardStore, manifest: schema.Manifest) -> schema.Manifest:
    """The manifest plus the shards whose record object exists (fetched by name: no listing needed)."""
    wanted = [schema.record_name(i) for i in range(manifest.num_shards)
              if schema.shard_name(i) not in manifest.shards]
    found = store.read_each(wanted, schema.MAX_SHARD_RECORD_BYTES)
    if not found:
        return manifest
    shards = manifest.model_dump(mode="json")["shards"]
    for name, data in found.items():
        record = schema.parse_json(schema.ShardRecord, data, limit=schema.MAX_SHARD_RECORD_BYTES,
                                   where=store.where(name), what="the shard record",
                                   fix="regenerate the shard with clsp-gen")
        shards[schema.shard_name(record.index)] = record.model_dump(mode="json")
    try:
        return schema.Manifest.model_validate({**manifest.model_dump(mode="json"), "shards": shards})
    except ValidationError as err:
        raise ShardError(f"the shard records do not fit the manifest, {schema.validation_summary(err)} "
                         f"({store.location}): {_REGENERATE}") from None


def _refuse_compressed(head: bytes, where: str) -> None:
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise ShardError(f"shard is {kind}-compressed ({where}): shards are plain tar files; "
                             f"regenerate it with clsp-gen")


def tar_samples(stream: IO[bytes], shape: tuple[int, int],
                where: str) -> Iterator[tuple[str, dict[str, bytes], list[str]]]:
    """(key, readable members by suffix, names of members left unread) per sample, in tar order.

    ``stream`` is a seekable binary file of the shard (``ShardStore.fetched``), read from its start as an
    uncompressed tar stream; a readable member larger than its limit (from the tar header) is refused
    before it is read, and every other member is skipped unread. ``where`` names the shard in errors.
    """
    stream.seek(0)
    _refuse_compressed(stream.read(8), where)
    stream.seek(0)
    key: str | None = None
    members: dict[str, bytes] = {}
    unread: list[str] = []
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                match = _MEMBER.match(info.name)
                if match is None:
                    raise ShardError(f"member {info.name[:80]!r} is not named <key>.<suffix> ({where}): "
                                     f"{_REGENERATE}")
                if match[1] != key:
                    if key is not None:
                        yield key, members, unread
                    key, members, unread = match[1], {}, []
                suffix = match[2]
                if suffix in members or suffix in unread:  # a dict of members would silently keep the last copy
                    raise ShardError(f"member {info.name[:80]} appears twice ({where}): {_REGENERATE}")
                if not info.isfile() or not schema.is_readable_member(f".{suffix}"):
                    unread.append(suffix)
                    continue
                if info.size > schema.member_limit(suffix, shape):
                    raise ShardError(f"member {info.name} is {info.size} bytes, over the limit of "
                                     f"{schema.member_limit(suffix, shape)} ({where}): {_REGENERATE}")
                data = tar.extractfile(info)
                if data is None:  # a regular file (checked above) always extracts
                    raise ShardError(f"member {info.name[:80]} cannot be read ({where}): {_REGENERATE}")
                members[suffix] = data.read()
    except (tarfile.TarError, EOFError, ValueError) as err:
        if isinstance(err, ShardError):
            raise
        raise ShardError(f"truncated or not a valid tar, {str(err)[:200]} ({where}): {_REGENERATE}") from None
    if key is not None:
        yield key, members, unread


@dataclass(frozen=True)
class ShardDirectory:
    """A shard directory and its one validated manifest: geometry, records and verified reading."""

    store: ShardStore
    manifest: schema.Manifest

    @classmethod
    def open(cls, directory: Location) -> ShardDirectory:
        store = ShardStore.open(directory)
        return cls(store, read_manifest(store))

    @property
    def path(self) -> str:
        """The directory as given (a local path or a URL), for messages."""
        return self.store.location

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def anchor_range(self, shard_index: int) -> range:
        return self.manifest.anchor_range(shard_index)

    def shard_path(self, shard_index: int) -> str:
        """Where shard ``shard_index`` is, as messages name it."""
        return self.store.where(schema.shard_name(shard_index))

    def record(self, shard_index: int) -> schema.ShardRecord:
        """The manifest's record of a finished shard; ShardError when the shard is not finished."""
        record = self.manifest.shards.get(schema.shard_name(shard_index))
        if record is None:
            raise ShardError(f"shard {shard_index} is not finished ({self.shard_path(shard_index)}): "
                             f"run clsp-gen to complete it")
        return record

    def _checked(self, shard_index: int, stream: IO[bytes]) -> schema.ShardRecord:
        """The shard's record, after the fetched file's size and sha256 match it; ShardError naming it if not."""
        record = self.record(shard_index)
        size, sha256 = file_digest(stream)
        if size != record.bytes or sha256 != record.sha256:
            what = f"{size} bytes, the manifest records {record.bytes}" if size != record.bytes else "sha256 differs"
            raise ShardError(f"shard is damaged or altered, {what} ({self.shard_path(shard_index)}): {_REGENERATE}")
        return record

    def _fetched(self, shard_index: int):
        """The recorded shard's file; ShardError when it is missing."""
        name = schema.shard_name(shard_index)
        self.record(shard_index)
        if not self.store.exists(name):
            raise ShardError(f"shard is missing, the manifest records it ({self.shard_path(shard_index)}): "
                             f"{_REGENERATE}")
        return self.store.fetched(name)

    def check_shard(self, shard_index: int) -> schema.ShardRecord:
        """The shard's record, after its file's size and sha256 match it; ShardError naming the file if not."""
        with self._fetched(shard_index) as stream:
            return self._checked(shard_index, stream)

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
        ``schema.decode_member``; one download serves the sha256 check and the read."""
        where, anchors = self.shard_path(shard_index), self.anchor_range(shard_index)
        with self._fetched(shard_index) as stream:
            record = self._checked(shard_index, stream)
            count = 0
            for key, members, _ in tar_samples(stream, self.manifest.image_shape, where):
                sample = schema.check_sample(key, members, candidates=record.candidates, where=where)
                if count >= len(anchors) or sample.anchor_index != anchors[count]:
                    want = anchors[count] if count < len(anchors) else "none"
                    raise ShardError(f"shard holds anchor {sample.anchor_index} where its range "
                                     f"{anchors.start}-{anchors.stop - 1} has {want} ({where}): {_REGENERATE}")
                count += 1
                yield key, sample, members
        if count != len(anchors):
            raise ShardError(f"shard holds {count} of its {len(anchors)} anchors ({where}): {_REGENERATE}")

    def read_shard(self, shard_index: int) -> Iterator[schema.ShardSample]:
        """The samples of one verified shard: exactly its anchors, in order, or a ShardError naming it."""
        where, shape = self.shard_path(shard_index), self.manifest.image_shape
        for key, record, members in self.read_records(shard_index):
            yield schema.sample_from(key, record, members, shape=shape, where=where)

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
