"""Weighted cosine kNN over frozen backbone features (InstDisc / solo-learn protocol).

Each test image's ``k`` nearest training images by cosine similarity (FAISS inner product on
L2-normalised features) vote for their label with weight ``exp(similarity / temperature)``. As in the
authors' evaluation (METHOD.md section 4), the training images' features are taken with a random
horizontal flip, the test images' without.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from clsp.datasets import ImageDataset
from clsp.evaluate.features import FrozenEncoder, extract_features, randomly_flipped_features

KS = (5, 10, 20, 50, 100, 200)
TEMPERATURE = 0.07


def normalized(features: np.ndarray) -> np.ndarray:
    """float32 copy with unit-length rows (what FAISS inner products need to be cosines)."""
    out = np.ascontiguousarray(features, dtype=np.float32).copy()
    faiss.normalize_L2(out)
    return out


def cosine_index(features: np.ndarray) -> faiss.IndexFlatIP:
    """Exact cosine-similarity index over the rows of ``features``."""
    index = faiss.IndexFlatIP(features.shape[1])
    index.add(normalized(features))
    return index


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, ks: Sequence[int] = KS, temperature: float = TEMPERATURE,
                 num_classes: int | None = None) -> dict[int, float]:
    """Top-1 (%) of the weighted kNN vote for each ``k`` (capped at the training-set size)."""
    train_labels = np.asarray(train_labels, dtype=np.int64)
    test_labels = np.asarray(test_labels, dtype=np.int64)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    ks = sorted({min(int(k), len(train_features)) for k in ks})
    sims, ids = cosine_index(train_features).search(normalized(test_features), ks[-1])
    weights = np.exp(sims.astype(np.float64) / temperature)
    neighbour_labels = train_labels[ids]
    rows = np.repeat(np.arange(len(test_labels)), ks[-1]).reshape(len(test_labels), ks[-1])
    table = {}
    for k in ks:
        votes = np.zeros((len(test_labels), num_classes))
        np.add.at(votes, (rows[:, :k], neighbour_labels[:, :k]), weights[:, :k])
        table[k] = float((votes.argmax(1) == test_labels).mean() * 100)
    return table


def knn_protocol(encoder: FrozenEncoder, train: ImageDataset, test: ImageDataset, *, ks: Sequence[int] = KS,
                 temperature: float = TEMPERATURE, batch_size: int = 256, cache_dir: str | Path | None = None,
                 seed: int = 0) -> dict:
    """kNN evaluation of ``encoder`` on a labelled train/test pair: the table over ``ks`` and the best k
    (``seed`` draws the training images' flips)."""
    train_features = randomly_flipped_features(encoder, train, seed=seed, cache_dir=cache_dir, batch_size=batch_size)
    table = knn_accuracy(train_features, train.labels(),
                         extract_features(encoder, test, cache_dir=cache_dir, batch_size=batch_size), test.labels(),
                         ks=ks, temperature=temperature, num_classes=train.num_classes)
    best_k = max(table, key=lambda k: (table[k], -k))
    return {"dataset": train.name, "best_top1": table[best_k], "best_k": best_k,
            "top1_by_k": {str(k): v for k, v in table.items()}, "temperature": temperature,
            "train_flip": True, "seed": seed,
            "train_size": len(train), "test_size": len(test), "split": test.split, "encoder": encoder.describe()}
