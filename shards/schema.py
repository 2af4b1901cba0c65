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
                       unknown), ``candidates`` (k, the number of positives), ``seed`` (int or
                       null: the sampler seed of this anchor), ``schema_version`` (1)
``<key>.pos0.png``     synthetic positive 0 .. k-1: lossless 8-bit RGB PNG, all of one size
...
``<key>.pos{k-1}.png``
``<key>.anchor.png``   optional: the real anchor image itself, 8-bit RGB PNG
=====================  ====================================================================

Readers decode only ``.json`` and ``.png`` members (``.cls`` is also admitted, as WebDataset's
label convention, but the label is taken from the JSON record). Every other member, in particular
``.pyd`` / ``.pickle``, is never read, so a shard cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

SCHEMA_VERSION = 1

KEY_DIGITS = 9
READABLE_SUFFIXES = (".json", ".png", ".cls")


def sample_key(anchor_index: int) -> str:
    """The tar key of an anchor's sample: its index, zero-padded so keys sort in anchor order."""
    return f"{int(anchor_index):0{KEY_DIGITS}d}"


def shard_name(shard_index: int) -> str:
    return f"shard-{int(shard_index):06d}.tar"


def record_name(shard_index: int) -> str:
    """The per-shard JSON record written beside a finished shard."""
    return f"shard-{int(shard_index):06d}.json"


@dataclass
class ShardSample:
    """One anchor and its k synthetic positives, as the generator hands them to the writer."""

    anchor_index: int
    positives: np.ndarray  # uint8 [k, H, W, 3]
    label: int = -1
    seed: int | None = None
    anchor: np.ndarray | None = None  # uint8 [H, W, 3]


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 ``[H, W, 3]`` image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` array; ValueError for anything but an intact 8-bit RGB PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG" or image.mode != "RGB":
                raise ValueError(f"expected an 8-bit RGB PNG, got {image.format} {image.mode}")
            return np.asarray(image).copy()
    except (OSError, SyntaxError) as err:  # PIL's errors for damaged image data
        raise ValueError(f"unreadable PNG ({err})") from None


def encode_sample(sample: ShardSample) -> dict[str, Any]:
    """The tar members of one sample, keyed as ``webdataset.TarWriter`` expects (bytes values)."""
    positives = np.asarray(sample.positives)
    if positives.ndim != 4 or len(positives) == 0:
        raise ValueError(f"positives of anchor {sample.anchor_index} must be uint8 [k, H, W, 3], "
                         f"got {list(positives.shape)}")
    record = {"anchor_index": int(sample.anchor_index), "label": int(sample.label),
              "candidates": len(positives), "seed": None if sample.seed is None else int(sample.seed),
              "schema_version": SCHEMA_VERSION}
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


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn a raw WebDataset sample (member suffix -> bytes) into arrays, touching only JSON and PNG.

    Raises ValueError naming the sample when a member is missing or malformed.
    """
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise ValueError(f"sample {key} has no .json record")
    try:
        record = json.loads(raw["json"])
        anchor_index, k = int(record["anchor_index"]), int(record["candidates"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"sample {key} has a malformed .json record ({err})") from None
    if key != "?" and key != sample_key(anchor_index):
        raise ValueError(f"sample {key} records anchor_index {anchor_index}")
    missing = [f"pos{j}.png" for j in range(k) if f"pos{j}.png" not in raw]
    if k < 1 or missing:
        raise ValueError(f"sample {key} records {k} candidates but lacks {', '.join(missing) or 'positives'}")
    positives = [decode_png(raw[f"pos{j}.png"]) for j in range(k)]
    if len({p.shape for p in positives}) != 1:
        raise ValueError(f"sample {key} has positives of different sizes")
    seed = record.get("seed")
    return {"anchor_index": anchor_index, "label": int(record.get("label", -1)),
            "seed": None if seed is None else int(seed), "positives": np.stack(positives),
            "anchor": decode_png(raw["anchor.png"]) if "anchor.png" in raw else None}
