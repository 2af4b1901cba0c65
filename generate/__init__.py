"""Stage 1: synthetic positives by interpolated DDIM sampling from an unconditional diffusion model."""

from clsp.generate.sampler import interpolated_noise_prediction, sample_positives

__all__ = ["interpolated_noise_prediction", "sample_positives"]
