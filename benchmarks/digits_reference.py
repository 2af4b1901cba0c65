"""The reference digit classifier shared by the digits benchmarks.

An RBF support-vector classifier on 16x16 grey digits (train split), with calibrated probabilities.
A linear model is confidently wrong far from the data (noise blobs get probability 1.0); far from
every training digit the SVC's probabilities flatten, so its confidence means something.
"""

from __future__ import annotations

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.svm import SVC

from clsp.datasets import get_dataset

DESCRIPTION = "SVC(rbf, C=10, gamma=scale, Platt probabilities) on 16x16 grey digits (train split)"


def grey(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 16, 16, 3]`` -> float ``[n, 256]`` in [0, 1]."""
    return images.astype(np.float64).mean(-1).reshape(len(images), -1) / 255.0


def fit_reference_classifier() -> tuple[CalibratedClassifierCV, np.ndarray]:
    """The classifier, fitted on the real train split, and that split's grey features."""
    train = get_dataset("digits", "train")
    train_x = grey(train.array(range(len(train))))
    classifier = CalibratedClassifierCV(SVC(C=10.0, gamma="scale"), method="sigmoid", ensemble=False)
    classifier.fit(train_x, train.labels())
    return classifier, train_x
