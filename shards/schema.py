"""The shard sample layout: the one format the generation and training stages share.

Schema version 1
----------------
A shard directory holds ``manifest.json``, WebDataset tar shards ``shard-000000.tar``,
``shard-000001.tar``, ... and one record ``shard-000000.json`` per finished shard. Shard ``i`` holds
exactly the anchors ``[i * shard_size, min((i + 1) * shard_size, num_anchors))``, one sample per
anchor. A sample's key is its anchor index in the real dataset, zero-padded to nine digits
(``000000042``), and its tar members are:

=====================  ====================================================================
member                 content
=====================  ====================================================================
``<key>.json``         UTF-8 JSON record: ``anchor_index`` (int), ``label`` (int, -1 when
                       unknown), ``candidates`` (k, 1..64), ``seed`` (int or null: the sampler
                       seed of this anchor), ``schema_version`` (1), and optionally ``scores``
                       (k finite floats in [-1, 1], one per candidate) and, for positives of a
                       class-conditional model, ``condition`` (the label they were drawn for)
                       with ``guidance`` (the classifier-free guidance weight)
``<key>.pos0.png``     synthetic positive 0 .. k-1: lossless 8-bit RGB PNG of the manifest's
...                    image size
``<key>.pos{k-1}.png``
``<key>.anchor.png``   optional: the real anchor image itself, 8-bit RGB PNG of the same size
=====================  ====================================================================

Readers decode only ``.json`` and ``.png`` members (``.cls`` is also admitted, as WebDataset's
label convention, but the label is taken from the JSON record). Every other member, in particular
``.pyd`` / ``.pickle``, is never read, so a shard cannot run code when it is loaded.

The manifest, a shard record and a sample record are each parsed once, from bounded bytes, by the
declared models below; anything else is a ``ShardError`` naming the file. Pixels are decoded only
after the PNG header shows the expected size.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from clsp.errors import ShardError

SCHEMA_VERSION = 1

KEY_DIGITS = 9
READABLE_SUFFIXES = (".json", ".png", ".cls")

MAX_CANDIDATES = 64
MAX_IMAGE_SIZE = 4096  # pixels per side
MAX_ANCHORS = 10**9
MAX_SHARDS = 100_000  # a manifest claiming more is refused before any per-shard work (the names allow 10**6)
MAX_SAMPLE_RECORD_BYTES = 16 * 1024
MAX_SHARD_RECORD_BYTES = 16 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # about 200,000 shard entries
SHARD_NAME = r"^shard-\d{6}\.tar$"

T = TypeVar("T", bound=BaseModel)
Text = Annotated[str, StringConstraints(max_length=4096)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Scalar = bool | int | float | Text | None
Score = Annotated[float, Field(ge=-1.0, le=1.0, allow_inf_nan=False)]


def sample_key(anchor_index: int) -> str:
    """The tar key of an anchor's sample: its index, zero-padded so keys sort in anchor order."""
    return f"{int(anchor_index):0{KEY_DIGITS}d}"


def shard_name(shard_index: int) -> str:
    return f"shard-{int(shard_index):06d}.tar"


def record_name(shard_index: int) -> str:
    """The per-shard JSON record written beside a finished shard."""
    return f"shard-{int(shard_index):06d}.json"


class _Strict(BaseModel):
    """Exact types (no ``"1"`` for 1, no 1.0 for 1), unknown fields refused, objects immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class DatasetInfo(_Strict):
    """The real dataset the shards were made from (``ImageDataset.describe()``)."""

    name: Name
    split: Name
    size: int = Field(ge=1, le=MAX_ANCHORS)
    fingerprint: Name
    image_size: int = Field(ge=1, le=MAX_IMAGE_SIZE)
    num_classes: int | None = Field(default=None, ge=0, le=10**6)


class ShardRecord(_Strict):
    """A finished shard: ``shard-NNNNNN.json`` and its entry in the manifest."""

    index: int = Field(ge=0, lt=MAX_ANCHORS)
    samples: int = Field(ge=1, le=MAX_ANCHORS)
    first_anchor: int = Field(ge=0, lt=MAX_ANCHORS)
    last_anchor: int = Field(ge=0, lt=MAX_ANCHORS)
    candidates: int = Field(ge=1, le=MAX_CANDIDATES)
    bytes: int = Field(ge=1024, le=1 << 40)  # a tar is at least its two end blocks
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    rank: int = Field(ge=0, le=10**6)
    world_size: int = Field(ge=1, le=10**6)

    @model_validator(mode="after")
    def _consistent(self) -> ShardRecord:
        if self.last_anchor - self.first_anchor + 1 != self.samples:
            raise ValueError(f"anchors {self.first_anchor}..{self.last_anchor} are not {self.samples} samples")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        return self


class Manifest(_Strict):
    """``manifest.json``: the dataset, the settings, the shard geometry and every finished shard."""

    schema_version: int = Field(ge=1, le=SCHEMA_VERSION)
    dataset: DatasetInfo
    generation: dict[Name, Scalar] = Field(max_length=256)
    num_anchors: int = Field(ge=1, le=MAX_ANCHORS)
    shard_size: int = Field(ge=1, le=MAX_ANCHORS)
    num_shards: int = Field(ge=1, le=MAX_SHARDS)
    shards: dict[Annotated[str, StringConstraints(pattern=SHARD_NAME)], ShardRecord]

    @model_validator(mode="after")
    def _geometry(self) -> Manifest:
        """The stored shard count and every record must match ``num_anchors`` and ``shard_size``."""
        if self.num_anchors > self.dataset.size:
            raise ValueError(f"num_anchors {self.num_anchors} exceeds the dataset's {self.dataset.size} images")
        if self.num_shards != math.ceil(self.num_anchors / self.shard_size):
            raise ValueError(f"num_shards {self.num_shards} does not match {self.num_anchors} anchors in shards "
                             f"of {self.shard_size}")
        for name, record in self.shards.items():
            if name != shard_name(record.index):
                raise ValueError(f"shards.{name} records shard index {record.index}")
            if record.index >= self.num_shards:
                raise ValueError(f"shards.{name} is not one of the {self.num_shards} planned shards")
            anchors = self.anchor_range(record.index)
            if (record.first_anchor, record.last_anchor) != (anchors.start, anchors.stop - 1):
                raise ValueError(f"shards.{name} records anchors {record.first_anchor}..{record.last_anchor}, "
                                 f"the geometry gives {anchors.start}..{anchors.stop - 1}")
        return self

    def anchor_range(self, shard_index: int) -> range:
        """The anchors shard ``shard_index`` holds: ``[i * shard_size, min((i + 1) * shard_size, num_anchors))``."""
        if not 0 <= shard_index < self.num_shards:
            raise ValueError(f"shard index {shard_index} is outside 0..{self.num_shards - 1}")
        return range(shard_index * self.shard_size, min((shard_index + 1) * self.shard_size, self.num_anchors))

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of every positive and stored anchor."""
        return self.dataset.image_size, self.dataset.image_size

    @property
    def recorded(self) -> list[int]:
        """Indices of the shards recorded as finished, in order."""
        return sorted(record.index for record in self.shards.values())


def new_manifest(*, dataset: dict, generation: dict, num_anchors: int, shard_size: int) -> Manifest:
    """A manifest with no finished shard yet (what the writer starts a directory with)."""
    if shard_size > 0 and math.ceil(num_anchors / shard_size) > MAX_SHARDS:
        raise ShardError(f"{num_anchors} anchors in shards of {shard_size} make more than the {MAX_SHARDS} shards a "
                         f"directory may hold; pass a --shard-size of at least {math.ceil(num_anchors / MAX_SHARDS)}")
    return Manifest.model_validate(
        {"schema_version": SCHEMA_VERSION, "dataset": dataset, "generation": generation, "num_anchors": num_anchors,
         "shard_size": shard_size, "num_shards": math.ceil(num_anchors / shard_size) if shard_size > 0 else 0,
         "shards": {}}, strict=False)


class SampleRecord(_Strict):
    """``<key>.json``: what a sample says about itself."""

    anchor_index: int = Field(ge=0, lt=MAX_ANCHORS)
    label: int = Field(ge=-1, le=10**6)
    candidates: int = Field(ge=1, le=MAX_CANDIDATES)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    scores: list[Score] | None = Field(default=None, max_length=MAX_CANDIDATES)
    condition: int | None = Field(default=None, ge=0, le=10**6)
    guidance: float | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _one_score_per_candidate(self) -> SampleRecord:
        if self.scores is not None and len(self.scores) != self.candidates:
            raise ValueError(f"{len(self.scores)} scores for {self.candidates} candidates")
        if (self.condition is None) != (self.guidance is None):
            raise ValueError("condition and guidance come together (positives of a class-conditional model)")
        return self


def validation_summary(err: ValidationError) -> str:
    """The first problems of a validation error, as ``field: message`` on one line."""
    parts = []
    for item in err.errors()[:3]:
        where = ".".join(str(part) for part in item["loc"]) or "document"
        parts.append(f"{where}: {item['msg']}")
    more = err.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_json(model: type[T], data: bytes, *, limit: int, where: str | Path, what: str, fix: str) -> T:
    """Parse and validate ``data`` as ``model``: the size is bounded before anything is parsed.

    pydantic's own JSON parser (never ``json.loads``) stops at its nesting limit (200 levels) with a
    validation error, so a deeply nested document costs neither recursion nor memory.

    Raises ``ShardError`` ``"<what> is not valid (<where>): <fix>"`` style messages, one line each.
    """
    if len(data) > limit:
        raise ShardError(f"{what} is {len(data)} bytes, over the {limit}-byte limit ({where}): {fix}")
    try:
        return model.model_validate_json(data)
    except ValidationError as err:
        newer = [e["input"] for e in err.errors() if e["loc"] == ("schema_version",) and e["type"] == "less_than_equal"]
        if newer:
            raise ShardError(f"{what} has schema version {newer[0]}, newer than this clsp understands "
                             f"({SCHEMA_VERSION}) ({where}): upgrade clsp") from None
        raise ShardError(f"{what} is malformed, {validation_summary(err)} ({where}): {fix}") from None


@dataclass
class ShardSample:
    """One anchor and its k synthetic positives: what the generator writes and the reader returns."""

    anchor_index: int
    positives: np.ndarray  # uint8 [k, H, W, 3]
    label: int = -1
    seed: int | None = None
    anchor: np.ndarray | None = None  # uint8 [H, W, 3]
    scores: np.ndarray | None = None  # float32 [k] in [-1, 1]: one per candidate, when the generator scored them
    condition: int | None = None  # the label a class-conditional model drew the positives for
    guidance: float | None = None  # ... and its classifier-free guidance weight


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 ``[H, W, 3]`` image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def max_png_bytes(shape: tuple[int, int]) -> int:
    """The largest PNG member accepted for images of ``shape``: raw RGB plus generous zlib and chunk overhead."""
    return 2 * shape[0] * shape[1] * 3 + 64 * 1024


def decode_png(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array of the expected ``(H, W)``; ValueError for anything else.

    Only the header is read before the size is checked, so a huge or bomb PNG is refused undecoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                found = (image.mode, image.size)
                array = np.asarray(image) if found == ("RGB", (shape[1], shape[0])) else None
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            MemoryError, TypeError, ValueError) as err:
        raise ValueError(f"unreadable PNG ({type(err).__name__}: {err})") from None
    if array is None:
        raise ValueError(f"expected an 8-bit RGB PNG of {shape[1]}x{shape[0]}, got {found[0]} "
                         f"{found[1][0]}x{found[1][1]}")
    if array.shape != (*shape, 3) or array.dtype != np.uint8:
        raise ValueError(f"unreadable PNG (decoded {array.dtype} {list(array.shape)})")
    return array.copy()


def encode_sample(sample: ShardSample) -> dict[str, Any]:
    """The tar members of one sample, keyed as ``webdataset.TarWriter`` expects (bytes values)."""
    positives = np.asarray(sample.positives)
    if positives.ndim != 4 or len(positives) == 0:
        raise ValueError(f"positives of anchor {sample.anchor_index} must be uint8 [k, H, W, 3], "
                         f"got {list(positives.shape)}")
    record: dict[str, Any] = {"anchor_index": int(sample.anchor_index), "label": int(sample.label),
              "candidates": len(positives), "seed": None if sample.seed is None else int(sample.seed),
              "schema_version": SCHEMA_VERSION}
    if sample.scores is not None:
        record["scores"] = [float(s) for s in np.asarray(sample.scores).reshape(-1)]
    if sample.condition is not None or sample.guidance is not None:  # absent from unconditional records
        record["condition"] = None if sample.condition is None else int(sample.condition)
        record["guidance"] = None if sample.guidance is None else float(sample.guidance)
    SampleRecord.model_validate(record)  # never write what a reader would refuse
    members: dict[str, Any] = {"__key__": sample_key(sample.anchor_index),
                               "json": json.dumps(record, sort_keys=True).encode()}
    for j, positive in enumerate(positives):
        members[f"pos{j}.png"] = encode_png(positive)
    if sample.anchor is not None:
        members["anchor.png"] = encode_png(np.asarray(sample.anchor))
    return members


def is_readable_member(name: str) -> bool:
    """Tar members a reader loads at all; anything else (``.pyd``, ``.pickle``, ...) is skipped unread."""
    return name.lower().endswith(READABLE_SUFFIXES)


def member_limit(suffix: str, shape: tuple[int, int]) -> int:
    """The most bytes a readable member may have; checked from the tar header before it is read."""
    return MAX_SAMPLE_RECORD_BYTES if not suffix.lower().endswith(".png") else max_png_bytes(shape)


_FIX = "regenerate the shard with clsp-gen"


def check_sample(key: str, members: dict[str, bytes], *, candidates: int | None, where: str | Path) -> SampleRecord:
    """The validated record of one sample whose members match it; no pixel is decoded.

    ``candidates`` is the k its shard record promises (None: any). Raises ``ShardError`` naming the
    sample and ``where`` (the shard) when the record is missing or malformed or the members disagree with it.
    """
    if "json" not in members:
        raise ShardError(f"sample {key} has no .json record ({where}): {_FIX}")
    record = parse_json(SampleRecord, members["json"], limit=MAX_SAMPLE_RECORD_BYTES, where=where,
                        what=f"the .json record of sample {key}", fix=_FIX)
    k = record.candidates
    if key != sample_key(record.anchor_index):
        raise ShardError(f"sample {key} records anchor_index {record.anchor_index} ({where}): {_FIX}")
    if candidates is not None and k != candidates:
        raise ShardError(f"sample {key} records {k} candidates, its shard {candidates} ({where}): {_FIX}")
    expected = {f"pos{j}.png" for j in range(k)}
    present = {name for name in members if name.startswith("pos")}
    if present != expected:
        odd = sorted(present ^ expected)
        raise ShardError(f"sample {key} records {k} candidates but has or lacks {', '.join(odd[:4])} ({where}): {_FIX}")
    return record


def decode_member(key: str, members: dict[str, bytes], name: str, *, shape: tuple[int, int],
                  where: str | Path) -> np.ndarray:
    """One PNG member of a checked sample (``pos3.png``, ``anchor.png``) as uint8 ``[H, W, 3]``, or ShardError."""
    try:
        return decode_png(members[name], shape)
    except ValueError as err:
        raise ShardError(f"sample {key}: {err} ({where}): {_FIX}") from None


def decode_sample(key: str, members: dict[str, bytes], *, shape: tuple[int, int], candidates: int | None,
                  where: str | Path) -> ShardSample:
    """Turn one sample's members (suffix -> bytes) into a ``ShardSample``, touching only JSON and PNG.

    ``shape`` is the manifest's image size, ``candidates`` the k its shard record promises (None: any).
    Raises ``ShardError`` naming the sample and ``where`` (the shard) when anything is missing or malformed.
    """
    return sample_from(key, check_sample(key, members, candidates=candidates, where=where), members,
                       shape=shape, where=where)


def sample_from(key: str, record: SampleRecord, members: dict[str, bytes], *, shape: tuple[int, int],
                where: str | Path) -> ShardSample:
    """The ``ShardSample`` of a sample ``check_sample`` has accepted: every PNG decoded."""
    positives = np.stack([decode_member(key, members, f"pos{j}.png", shape=shape, where=where)
                          for j in range(record.candidates)])
    anchor = decode_member(key, members, "anchor.png", shape=shape, where=where) if "anchor.png" in members else None
    scores = None if record.scores is None else np.asarray(record.scores, dtype=np.float32)
    return ShardSample(anchor_index=record.anchor_index, positives=positives, label=record.label, seed=record.seed,
                       anchor=anchor, scores=scores, condition=record.condition, guidance=record.guidance)
