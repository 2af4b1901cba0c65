"""Stage 3's settings: one model per ``clsp-eval`` command, and pipeline.yaml's ``evaluate`` section.

The linear probe defaults to the authors' protocol (METHOD.md section 4), the one behind the paper's
numbers; ``standardized`` is this project's earlier probe, kept as a named alternative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from clsp.config import DATASET_HELP, Settings, ValidationSettings, same_setting, setting
from clsp.datasets import DEFAULT_DATA_ROOT, dataset_info

LinearProtocol = Literal["authors", "standardized"]
KNN_KS = (5, 10, 20, 50, 100, 200)
LABELLED_HELP = f"Labelled dataset: {DATASET_HELP[0].lower()}{DATASET_HELP[1:]}"


class EncoderEval(Settings):
    """What every encoder evaluation shares: the encoder, where results go, the data."""

    encoder: str = setting(..., "Exported encoder directory (clsp-train --out).", min_length=1)
    out: str | None = setting(None, "Run directory for results.json and report.md [default: the encoder "
                                    "directory].", role="location")
    cache_dir: str | None = setting(None, "Feature cache [default: RUN_DIR/feature-cache].", role="location")
    data_root: str = setting(DEFAULT_DATA_ROOT, "Where datasets are stored or downloaded (env CLSP_DATA_ROOT).",
                             role="location")
    batch_size: int = setting(256, "Images per feature-extraction (and classifier) batch.", role="speed",
                              ge=1, le=65536)
    seed: int = setting(0, "Seed of every random choice the command makes.", ge=0, le=2**63 - 1)
    download: bool = setting(True, "Download torchvision datasets that are missing under --data-root.",
                             role="location")


def _known_dataset(name: str) -> str:
    dataset_info(name)  # one line listing the known names
    return name


class LinearSettings(Settings):
    """The linear probe."""

    protocol: LinearProtocol = setting(
        "authors", "authors: raw features, random flip per epoch, default nn.Linear init, SGD without momentum "
                   "(METHOD.md section 4); standardized: standardised features, momentum 0.9, zero init, no flip.")
    epochs: int = setting(100, "Classifier epochs (lr x0.1 at 60% and 80% of them).", ge=1, le=100_000)
    lr: float | None = setting(None, "SGD learning rate [default: the encoder's recipe: 1.0, 10.0 for "
                                     "CIFAR-100 MoCo].", gt=0, le=1000)


class LinearJob(EncoderEval, LinearSettings, ValidationSettings):
    dataset: str = setting("digits", LABELLED_HELP)
    _dataset = field_validator("dataset")(_known_dataset)


class TransferJob(EncoderEval, LinearSettings):
    datasets: str = setting(..., "Comma-separated labelled datasets, e.g. cifar100,imagefolder:PATH.", min_length=1)


class KnnJob(EncoderEval, ValidationSettings):
    dataset: str = setting("digits", LABELLED_HELP)
    k: tuple[int, ...] = setting(KNN_KS, "Neighbour counts to try (repeatable); each is capped at the "
                                         "training-set size.")
    temperature: float = setting(0.07, "Vote weight exp(similarity / temperature).", gt=0, le=100)
    _dataset = field_validator("dataset")(_known_dataset)

    @field_validator("k")
    @classmethod
    def _positive(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or any(k < 1 or k > 100_000 for k in ks):
            raise ValueError(f"neighbour counts must lie in 1..100000, got {', '.join(map(str, ks))}")
        return ks


class PositivesJob(EncoderEval):
    shards: str = setting(..., "Shard directory or URL (clsp-gen --shards).", role="location", min_length=1)
    limit: int | None = setting(None, "Only the first N anchors.", ge=1)
    png: str | None = setting(None, "Histogram of the similarities [default: RUN_DIR/positives-similarity.png].",
                              role="location")


class EmbedPlotJob(EncoderEval):
    dataset: str = setting("digits", "Dataset whose test split is plotted.")
    png: str | None = setting(None, "Output PNG [default: RUN_DIR/tsne-DATASET.png].", role="location")
    max_points: int = setting(2000, "Plot at most this many test images (random subset).", ge=10, le=100_000)
    perplexity: float = setting(30.0, "t-SNE perplexity (capped for few points).", gt=0, le=1000)
    _dataset = field_validator("dataset")(_known_dataset)


class CompareJob(Settings):
    """``clsp-eval compare``: runs side by side beside the paper's numbers."""

    runs: tuple[str, ...] = setting(..., "A run directory with results.json under a label, LABEL=RUN_DIR "
                                         "(repeatable), e.g. clsp=runs/clsp.", cli="--run", min_length=1)
    dataset: str = setting("digits", "Dataset whose results are compared.")
    out: str = setting("report.md", "Markdown file to write.", role="location", min_length=1)
    _dataset = field_validator("dataset")(_known_dataset)


class EvaluateSettings(Settings):
    """Which evaluations ``clsp run`` makes (pipeline.yaml's ``evaluate`` section)."""

    linear: bool = setting(True, "Linear probe on the dataset's test split.")
    linear_protocol: LinearProtocol = same_setting(LinearSettings, "protocol")
    linear_epochs: int = same_setting(LinearSettings, "epochs")
    linear_lr: float | None = same_setting(LinearSettings, "lr")
    knn: bool = setting(True, "Weighted cosine kNN, k in 5..200.")
    positives: bool = setting(True, "Diagnostics of the synthetic positives.")
    embed_plot: bool = setting(False, "t-SNE plot of the test features.")
    transfer: list[str] = setting([], "Datasets for linear transfer.", max_length=64)

    @field_validator("transfer")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            _known_dataset(name)
        return names

    def jobs(self, *, dataset: str, validation: float, shards: str, out: str) -> dict[str, dict[str, Any]]:
        """The evaluations this section turns on: ``clsp-eval`` command (``EVALUATIONS``) -> its job's settings
        beside those every evaluation shares; a switch here is named as its command."""
        wanted: dict[str, dict[str, Any]] = {
            "linear": {"dataset": dataset, "protocol": self.linear_protocol, "epochs": self.linear_epochs,
                       "lr": self.linear_lr, "validation": validation},
            "knn": {"dataset": dataset, "validation": validation},
            "positives": {"shards": shards},
            "embed-plot": {"dataset": dataset, "png": str(Path(out) / "tsne.png")},
            "transfer": {"datasets": ",".join(self.transfer)},
        }
        return {command: values for command, values in wanted.items() if getattr(self, command.replace("-", "_"))}
