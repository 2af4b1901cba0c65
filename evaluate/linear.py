"""Linear probe: one linear layer on frozen backbone features (METHOD.md section 4).

SGD (lr 1.0, momentum 0.9, no weight decay), 100 epochs, lr x0.1 at 60% and 80% of the epochs.
With ``flip`` the training features of each epoch come from randomly flipped images. The backbone
is frozen and deterministic in eval mode, so that equals re-extracting features every epoch, but
it needs only two extractions (plain and flipped, both cached) instead of one per epoch.

Features are standardised with the training split's per-dimension mean and std first (a
BatchNorm without affine parameters, as in MAE's linear probe): the classifier is still linear in
the features, and lr 1.0 then means the same thing for every encoder whatever its feature scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from clsp.datasets import ImageDataset
from clsp.runtime import progress
from clsp.evaluate.features import FrozenEncoder, extract_features


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean() * 100)


def train_linear(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, epochs: int = 100, lr: float = 1.0,
                 batch_size: int = 256, seed: int = 0, flipped_train_features: np.ndarray | None = None,
                 log_dir: str | Path | None = None) -> dict:
    """Fit the linear classifier and return top-1/top-5 (%) on the test features."""
    generator = torch.Generator().manual_seed(seed)
    x_plain = torch.as_tensor(train_features, dtype=torch.float32)
    mean, std = x_plain.mean(0), x_plain.std(0).clamp_min(1e-6)
    x_plain = (x_plain - mean) / std
    x_flip = None
    if flipped_train_features is not None:
        x_flip = (torch.as_tensor(flipped_train_features, dtype=torch.float32) - mean) / std
    y = torch.as_tensor(train_labels, dtype=torch.long)
    classifier = nn.Linear(x_plain.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = sorted({max(1, round(epochs * 0.6)), max(1, round(epochs * 0.8))})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(log_dir))
    loss_value = float("nan")
    for epoch in progress(range(epochs), desc="linear", unit="epoch"):
        x = x_plain
        if x_flip is not None:
            use_flip = torch.rand(len(x_plain), generator=generator) < 0.5
            x = torch.where(use_flip[:, None], x_flip, x_plain)
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(classifier(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        loss_value = total / len(x)
        if writer is not None:
            writer.add_scalar("linear/train_loss", loss_value, epoch)
            writer.add_scalar("linear/lr", optimizer.param_groups[0]["lr"], epoch)
        scheduler.step()
    with torch.no_grad():
        logits = classifier((torch.as_tensor(test_features, dtype=torch.float32) - mean) / std)
    test_y = torch.as_tensor(test_labels, dtype=torch.long)
    result = {"top1": topk_accuracy(logits, test_y, 1), "top5": topk_accuracy(logits, test_y, 5),
              "train_loss": loss_value, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "milestones": milestones, "flip": x_flip is not None, "seed": seed,
              "train_size": len(x_plain), "test_size": len(test_y), "num_classes": num_classes}
    if writer is not None:
        writer.add_scalar("linear/test_top1", result["top1"], epochs)
        writer.add_scalar("linear/test_top5", result["top5"], epochs)
        writer.close()
    return result


def linear_protocol(encoder: FrozenEncoder, train: ImageDataset, test: ImageDataset, *, epochs: int = 100,
                    lr: float = 1.0, batch_size: int = 256, flip: bool = False, seed: int = 0,
                    cache_dir: str | Path | None = None, log_dir: str | Path | None = None) -> dict:
    """Linear evaluation of ``encoder`` on a labelled train/test pair (see ``features.labelled_splits``)."""
    features = extract_features(encoder, train, cache_dir=cache_dir, batch_size=batch_size)
    flipped = extract_features(encoder, train, cache_dir=cache_dir, flip=True, batch_size=batch_size) if flip else None
    test_features = extract_features(encoder, test, cache_dir=cache_dir, batch_size=batch_size)
    result = train_linear(features, train.labels(), test_features, test.labels(), num_classes=train.num_classes,
                          epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, flipped_train_features=flipped,
                          log_dir=log_dir)
    return {"dataset": train.name, **result, "encoder": encoder.describe()}
