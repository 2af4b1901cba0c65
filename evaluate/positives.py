"""What makes CLSP different, measured: how hard the synthetic positives are, and whether they keep
the class.

For every anchor in a shard directory, with a frozen encoder's features (cosine similarity):
an augmented view of the anchor (the encoder's training augmentation), the anchor's nearest other image in
the real dataset (NNCLR's positive), and its synthetic positives. The paper's claim is that
synthetic positives are harder than neighbours (lower similarity) while keeping the anchor's class,
which the label agreement checks through each positive's nearest real image.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from clsp.evaluate.features import FrozenEncoder, embed_batches, extract_features
from clsp.evaluate.knn import cosine_index, normalized
from clsp.evaluate.report import save_figure
from clsp.shards import reader
from clsp.shards.schema import ShardSample
from clsp.train.augment import augment_images, cpu_transform, view_augmentations

DISTRIBUTIONS = {"augmented_view": "augmented view of itself", "nearest_neighbour": "nearest real neighbour",
                 "synthetic": "synthetic positives"}


def summary(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None}
    return {"n": int(len(values)), "mean": float(values.mean()), "median": float(np.median(values)),
            "std": float(values.std()), "min": float(values.min()), "max": float(values.max())}


def _groups(samples: Iterable[ShardSample], size: int) -> Iterator[list[ShardSample]]:
    group: list[ShardSample] = []
    for sample in samples:
        group.append(sample)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _mean_pairwise(matrix: np.ndarray) -> float:
    upper = np.triu_indices(len(matrix), 1)
    return float(matrix[upper].mean())


def augmented_similarity(encoder: FrozenEncoder, images: np.ndarray, anchor_features: np.ndarray, spec,
                         *, seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """Cosine similarity of each image's features to those of one random training-style view of it."""
    view = view_augmentations(encoder.card.method, encoder.card.settings)[0]  # the encoder's own training view
    transform = cpu_transform(spec.size, spec.mean, spec.std, view)
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            views = normalized(encoder.embed_normalised(augment_images(transform, batch)))
            out.append((views * anchor_features[start:start + batch_size]).sum(1))
    return np.concatenate(out) if out else np.zeros(0)


def positives_stats(encoder: FrozenEncoder, shards: str | Path, *, data_root: str | Path, batch_size: int = 256,
                    limit: int | None = None, seed: int = 0, cache_dir: str | Path | None = None,
                    histogram: str | Path | None = None) -> dict:
    """Similarities, label agreement and candidate diversity of the positives in ``shards``."""
    from sklearn.metrics import pairwise_distances

    store = reader.ShardDirectory.open(shards)
    store.check_shards(limit)
    dataset = reader.load_dataset(store.manifest, data_root)
    spec = encoder.input_spec(dataset)
    real = normalized(extract_features(encoder, dataset, cache_dir=cache_dir, batch_size=batch_size))
    index = cosine_index(real)
    labels = dataset.labels() if dataset.has_labels else None

    seen, synthetic, agree, is_anchor, cos_div, pix_div = [], [], [], [], [], []
    samples = islice(store.samples(), limit)  # verified shards only: a damaged one is an error naming it
    for group in _groups(samples, max(1, batch_size // 4)):
        flat = np.concatenate([s.positives for s in group])
        feats = normalized(embed_batches(encoder, len(flat), flat.__getitem__, spec, batch_size=batch_size))
        _, nearest = index.search(feats, 1)
        offset = 0
        for sample in group:
            a, k = sample.anchor_index, len(sample.positives)
            own, own_nearest = feats[offset:offset + k], nearest[offset:offset + k, 0]
            offset += k
            seen.append(a)
            synthetic.append(own @ real[a])
            is_anchor.append(own_nearest == a)
            if labels is not None:
                agree.append(labels[own_nearest] == labels[a])
            if k >= 2:
                cos_div.append(_mean_pairwise(np.clip(1.0 - own @ own.T, 0.0, 2.0)))
                pixels = sample.positives.reshape(k, -1).astype(np.float64) / 255.0
                pix_div.append(_mean_pairwise(pairwise_distances(pixels)))
    anchors = np.asarray(seen, dtype=np.int64)

    sims, ids = index.search(real[anchors], min(2, len(real)))
    other = ids != anchors[:, None]
    has_other = other.any(1)
    first_other = other.argmax(1)
    rows = np.flatnonzero(has_other)
    neighbour_sims = sims[rows, first_other[rows]]
    neighbour_ids = ids[rows, first_other[rows]]
    augmented = augmented_similarity(encoder, dataset.array(anchors), real[anchors], spec, seed=seed,
                                     batch_size=batch_size)

    values = {"augmented_view": augmented, "nearest_neighbour": neighbour_sims,
              "synthetic": np.concatenate(synthetic) if synthetic else np.zeros(0)}
    stats = {name: summary(v) for name, v in values.items()}
    result = {
        "shards": str(shards), "dataset": store.manifest.dataset.name, "anchors": int(len(anchors)),
        "positives": stats["synthetic"]["n"], "similarity": stats,
        "synthetic_harder_than_neighbour": (None if stats["synthetic"]["mean"] is None
                                            or stats["nearest_neighbour"]["mean"] is None
                                            else stats["synthetic"]["mean"] < stats["nearest_neighbour"]["mean"]),
        "label_agreement": float(np.concatenate(agree).mean()) if agree else None,
        "neighbour_label_agreement": (float((labels[neighbour_ids] == labels[anchors[rows]]).mean())
                                      if labels is not None and len(rows) else None),
        "nearest_is_anchor": float(np.concatenate(is_anchor).mean()) if is_anchor else None,
        "diversity": {"feature_cosine_distance": float(np.mean(cos_div)) if cos_div else None,
                      "pixel_l2": float(np.mean(pix_div)) if pix_div else None},
        "encoder": encoder.describe(),
    }
    if histogram is not None:
        result["histogram"] = str(similarity_histogram(values, histogram, title=f"{result['dataset']}: "
                                                       f"{result['anchors']} anchors"))
    return result


def similarity_histogram(values: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """One PNG with the three similarity distributions overlaid."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    ax = figure.subplots()
    low = min((float(np.min(v)) for v in values.values() if len(v)), default=-1.0)
    bins = np.linspace(max(-1.0, min(low, 0.99) - 0.01), 1.0, 61)  # zoom on the range the data covers
    for name, v in values.items():
        if len(v):
            ax.hist(np.clip(v, -1, 1), bins=bins.tolist(), alpha=0.5, density=True,
                    label=f"{DISTRIBUTIONS[name]} (mean {np.mean(v):.3f})")
    ax.set_xlabel("cosine similarity to the anchor")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(loc="upper left")
    return save_figure(figure, path)
