"""Linear probe: one linear layer on frozen backbone features (METHOD.md section 4).

Two named protocols:

- ``authors`` (default; the protocol behind the paper's numbers): raw backbone features, a random
  horizontal flip of each training image every epoch, one ``nn.Linear`` with PyTorch's default init,
  SGD without momentum or weight decay, batch 256, lr x0.1 at 60 % and 80 % of the epochs; top-1 and
  top-5 of the last epoch. The backbone is frozen and in eval mode, so a flip in front of it equals
  choosing, per image and epoch, between its plain and its flipped features: both are extracted once.
- ``standardized``: features standardised with the training split's mean and std, zero-initialised
  layer, SGD momentum 0.9, no flips. Its numbers are not comparable with the paper's.

Beside either, every linear evaluation reports a deterministic probe: L2-regularised logistic regression
(C = 1, L-BFGS) on standardised features. It has no random state, so two runs whose features agree get
the same number, and a small test split cannot make many different encoders land on one value through
the SGD probe's noise. It is an instrument, not the paper's protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from clsp.datasets import ImageDataset
from clsp.errors import UserError
from clsp.evaluate.features import FrozenEncoder, extract_features
from clsp.evaluate.report import DETERMINISTIC_PROBE
from clsp.runtime import progress


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows whose label is among the ``k`` highest logits."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean() * 100)


def train_linear(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, num_classes: int, protocol: str = "authors", epochs: int = 100,
                 lr: float = 1.0, batch_size: int = 256, seed: int = 0,
                 flipped_train_features: np.ndarray | None = None, log_dir: str | Path | None = None) -> dict:
    """Fit the linear classifier under ``protocol`` and return top-1/top-5 (%) on the test features.

    ``flipped_train_features`` (the training images' features, flipped) is required by ``authors``."""
    authors = protocol == "authors"
    if authors and flipped_train_features is None:
        raise ValueError("the authors' protocol needs the flipped training features")
    generator = torch.Generator().manual_seed(seed)
    x_plain = torch.as_tensor(train_features, dtype=torch.float32)
    mean, std = (torch.zeros(x_plain.shape[1]), torch.ones(x_plain.shape[1])) if authors else \
        (x_plain.mean(0), x_plain.std(0).clamp_min(1e-6))
    x_plain = (x_plain - mean) / std
    x_flip = (torch.as_tensor(flipped_train_features, dtype=torch.float32) - mean) / std if authors else None
    y = torch.as_tensor(train_labels, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(x_plain.shape[1], num_classes)  # PyTorch's default init, seeded
    if not authors:
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.0 if authors else 0.9, weight_decay=0.0)
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
        if not np.isfinite(loss_value):
            raise UserError(f"the linear probe's loss became {loss_value} in epoch {epoch + 1}: lr {lr:g} is too "
                            "high for these features; pass a lower --lr")
        if writer is not None:
            writer.add_scalar("linear/train_loss", loss_value, epoch)
            writer.add_scalar("linear/lr", optimizer.param_groups[0]["lr"], epoch)
        scheduler.step()
    with torch.no_grad():
        logits = classifier((torch.as_tensor(test_features, dtype=torch.float32) - mean) / std)
    test_y = torch.as_tensor(test_labels, dtype=torch.long)
    result = {"top1": topk_accuracy(logits, test_y, 1), "top5": topk_accuracy(logits, test_y, 5),
              "train_loss": loss_value, "protocol": protocol, "epochs": epochs, "lr": lr, "batch_size": batch_size,
              "milestones": milestones, "flip": authors, "seed": seed,
              "train_size": len(x_plain), "test_size": len(test_y), "num_classes": num_classes}
    if writer is not None:
        writer.add_scalar("linear/test_top1", result["top1"], epochs)
        writer.add_scalar("linear/test_top5", result["top5"], epochs)
        writer.close()
    return result


DETERMINISTIC_C = 1.0
DETERMINISTIC_MAX_ITER = 1000


def deterministic_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                        test_labels: np.ndarray) -> dict:
    """Top-1/top-5 (%) of logistic regression on standardised features: fixed solver and C, no randomness."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=DETERMINISTIC_C, solver="lbfgs",
                                                               max_iter=DETERMINISTIC_MAX_ITER))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded below as "converged"
        model.fit(np.asarray(train_features, dtype=np.float64), np.asarray(train_labels))
    classes = model.classes_
    probabilities = torch.as_tensor(model.predict_proba(np.asarray(test_features, dtype=np.float64)))
    # the classifier's columns are the labels it saw; a test label it never saw counts as a miss
    columns = {int(label): column for column, label in enumerate(classes)}
    test_y = torch.as_tensor([columns.get(int(label), -1) for label in test_labels], dtype=torch.long)
    iterations = int(model[-1].n_iter_.max())
    return {"name": DETERMINISTIC_PROBE, "top1": topk_accuracy(probabilities, test_y, 1),
            "top5": topk_accuracy(probabilities, test_y, 5), "C": DETERMINISTIC_C, "solver": "lbfgs",
            "iterations": iterations, "converged": iterations < DETERMINISTIC_MAX_ITER}


def linear_protocol(encoder: FrozenEncoder, train: ImageDataset, test: ImageDataset, *, protocol: str = "authors",
                    epochs: int = 100, lr: float | None = None, batch_size: int = 256, seed: int = 0,
                    cache_dir: str | Path | None = None, log_dir: str | Path | None = None) -> dict:
    """Linear evaluation of ``encoder`` on a labelled train/test pair (see ``features.labelled_splits``);
    ``lr`` None takes the encoder's recipe value (1.0; 10.0 for CIFAR-100 MoCo)."""
    lr = lr if lr is not None else (encoder.card.probe_lr or 1.0)
    features = extract_features(encoder, train, cache_dir=cache_dir, batch_size=batch_size)
    flipped = extract_features(encoder, train, cache_dir=cache_dir, flip=True, batch_size=batch_size) \
        if protocol == "authors" else None
    test_features = extract_features(encoder, test, cache_dir=cache_dir, batch_size=batch_size)
    result = train_linear(features, train.labels(), test_features, test.labels(), num_classes=train.num_classes,
                          protocol=protocol, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          flipped_train_features=flipped, log_dir=log_dir)
    result["deterministic"] = deterministic_probe(features, train.labels(), test_features, test.labels())
    return {"dataset": train.name, **result, "split": test.split, "encoder": encoder.describe()}
