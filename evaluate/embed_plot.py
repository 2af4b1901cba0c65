"""A 2-D t-SNE map of test-split features, coloured by label: the quickest look at an encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clsp.evaluate.features import FrozenEncoder, extract_features, test_split
from clsp.evaluate.report import save_figure

EXACT_TSNE_MAX = 500


def embed_plot(encoder: FrozenEncoder, dataset: str, out: str | Path, *, root: str | Path, download: bool = True,
               max_points: int = 2000, perplexity: float = 30.0, seed: int = 0, batch_size: int = 256,
               cache_dir: str | Path | None = None) -> dict:
    """Write the t-SNE PNG to ``out`` (at most ``max_points`` test images, chosen at random)."""
    import matplotlib
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    test = test_split(dataset, root=root, download=download, image_size=encoder.card.image_size)
    features = extract_features(encoder, test, cache_dir=cache_dir, batch_size=batch_size)
    labels = test.labels()
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(features))[:max_points])
    features, labels = features[keep], labels[keep]
    # Barnes-Hut pays off only for many points; below that the exact gradient is much faster.
    points = TSNE(n_components=2, perplexity=min(perplexity, max(1.0, (len(features) - 1) / 3)), init="pca",
                  method="exact" if len(features) <= EXACT_TSNE_MAX else "barnes_hut",
                  random_state=seed).fit_transform(features)

    figure = Figure(figsize=(6, 6))
    ax = figure.subplots()
    labelled = labels >= 0
    if (~labelled).any():
        ax.scatter(points[~labelled, 0], points[~labelled, 1], color="grey", s=6, label="no label")
    if test.num_classes <= 20:
        colours = matplotlib.colormaps["tab10" if test.num_classes <= 10 else "tab20"]
        for c in np.unique(labels[labelled]):
            ax.scatter(points[labels == c, 0], points[labels == c, 1], color=colours(int(c)), s=6, label=str(c))
        ax.legend(title="label", loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=2, frameon=False)
    else:
        ax.scatter(points[labelled, 0], points[labelled, 1], c=labels[labelled], cmap="nipy_spectral", s=6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"t-SNE of {dataset} ({test.split}) features, {encoder.card.method or encoder.card.backbone}")
    path = save_figure(figure, out)
    return {"dataset": dataset, "png": str(path), "points": int(len(points)), "split": test.split,
            "encoder": encoder.describe()}
