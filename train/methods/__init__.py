"""The contrastive methods, each with the CLSP term: ``build_method(job, backbone)``."""

from __future__ import annotations

from torch import nn

from clsp.train.config import TrainJob
from clsp.train.methods.base import EncodedView, Method
from clsp.train.methods.moco import MoCo
from clsp.train.methods.nnclr import NNCLR
from clsp.train.methods.simclr import SimCLR
from clsp.train.recipes import METHODS

_CLASSES: dict[str, type[Method]] = {"simclr": SimCLR, "moco": MoCo, "nnclr": NNCLR}


def build_method(job: TrainJob, backbone: nn.Module) -> Method:
    """The method of a resolved ``job`` (``TrainJob.resolved``) on ``backbone`` (which needs ``.feature_dim``)."""
    common = {"clsp_lambda": job.clsp_lambda, "temperature": job.temperature,
              "proj_hidden_dim": job.proj_hidden_dim, "proj_output_dim": job.proj_output_dim,
              "forward_mode": job.forward}
    extra = {"simclr": {},
             "moco": {"queue_size": job.queue_size, "momentum": job.momentum, "momentum_end": job.momentum_end},
             "nnclr": {"queue_size": job.queue_size, "pred_hidden_dim": job.pred_hidden_dim,
                       "nn_index": job.nn_index}}[job.method]
    return _CLASSES[job.method](backbone, **common, **extra)


__all__ = ["METHODS", "EncodedView", "Method", "MoCo", "NNCLR", "SimCLR", "build_method"]
