"""clsp: Contrastive Learning with Synthetic Positives (ECCV 2024).

The pipeline is split by data flow: ``clsp.generate`` draws synthetic positives with a diffusion
model, ``clsp.shards`` is the on-disk contract between stages, ``clsp.train`` trains encoders on
real images plus those positives, and ``clsp.evaluate`` measures encoders and positives.
"""

__version__ = "0.1.0"
