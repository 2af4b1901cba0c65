"""The paper's reported numbers that the report puts beside a run's (METHOD.md section 5).

Linear top-1 (%) with the authors' probe after 1000 epochs, by dataset and column (``CLSP-SimCLR``,
``MoCo``, ...), for ResNet-18 and, where the paper reports it, ResNet-50.
"""

from __future__ import annotations

LINEAR_TOP1: dict[str, dict[str, float]] = {
    "cifar10": {"SimCLR": 91.45, "CLSP-SimCLR": 94.45, "MoCo": 92.29, "CLSP-MoCo": 94.62, "NNCLR": 91.88,
                "All4One": 93.24},
    "cifar100": {"SimCLR": 68.10, "CLSP-SimCLR": 72.41, "MoCo": 68.91, "CLSP-MoCo": 72.33, "NNCLR": 69.62,
                 "All4One": 72.17},
}
LINEAR_TOP1_RESNET50: dict[str, dict[str, float]] = {"cifar10": {"CLSP-MoCo": 96.04}, "cifar100": {"CLSP-MoCo": 76.43}}
