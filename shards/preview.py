"""A picture of a shard directory: each anchor beside its synthetic positives, one row per anchor."""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from clsp.errors import UserError
from clsp.shards import schema
from clsp.shards.reader import Location, ShardDirectory

PAD = 2  # white pixels between cells
ANCHOR_GAP = 4  # extra white pixels between the anchor column and the positives
MIN_CELL = 64  # smaller images are enlarged (nearest neighbour) to at least this many pixels


def _anchor_image(sample: schema.ShardSample, dataset, size: tuple[int, int]) -> np.ndarray:
    anchor = sample.anchor
    if anchor is None:
        anchor = np.asarray(dataset.array([sample.anchor_index])[0])
    if anchor.shape[:2] != size:
        anchor = np.asarray(Image.fromarray(anchor).resize(size[::-1], Image.BICUBIC))
    return anchor


def preview_png(directory: Location | ShardDirectory, num_anchors: int = 8, dataset=None) -> bytes:
    """One PNG with a row per anchor: the anchor, a gap, then its k positives.

    Anchors come from the shards when stored there, else from ``dataset`` (an ``ImageDataset``). Only
    verified shards are read (a damaged one is a ShardError naming it).
    Cells are enlarged by an integer factor (nearest neighbour) to at least ``MIN_CELL`` pixels.
    """
    if num_anchors < 1:
        raise UserError(f"--num-anchors must be at least 1, got {num_anchors}")
    store = directory if isinstance(directory, ShardDirectory) else ShardDirectory.open(directory)
    samples = list(islice(store.samples(), num_anchors))
    if dataset is None and any(s.anchor is None for s in samples):
        raise UserError(f"the shards in {store.path} do not store anchor images; pass the dataset (--data-root) "
                        f"so they can be shown")
    size = samples[0].positives.shape[1:3]
    anchors = np.stack([_anchor_image(s, dataset, size) for s in samples])
    return arrays_png(anchors, np.stack([s.positives for s in samples]))


def arrays_png(anchors: np.ndarray, positives: np.ndarray) -> bytes:
    """The same picture from arrays: uint8 anchors ``[n, H, W, 3]`` beside positives ``[n, k, H, W, 3]``.

    ``clsp-gen`` uses it to show positives before their shard is written.
    """
    size = positives.shape[2:4]
    cells = np.concatenate([anchors[:, None], positives], axis=1).reshape(-1, *positives.shape[2:])
    scale = max(1, math.ceil(MIN_CELL / min(size)))
    tensor = torch.from_numpy(np.ascontiguousarray(cells)).permute(0, 3, 1, 2)
    tensor = tensor.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(tensor, nrow=positives.shape[1] + 1, padding=PAD, pad_value=255)
    split = PAD + tensor.shape[3]  # right after the anchor column
    gap = torch.full((3, grid.shape[1], ANCHOR_GAP), 255, dtype=grid.dtype)
    grid = torch.cat([grid[:, :, :split], gap, grid[:, :, split:]], dim=2)
    return schema.encode_png(np.ascontiguousarray(grid.permute(1, 2, 0).numpy()))
