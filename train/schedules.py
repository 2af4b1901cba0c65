"""Values that move over training: the CLSP term's weight lambda (ramped up from 0, then held), and the
EMA coefficient of momentum copies (a half-cosine rise, solo-learn's).

Early on the encoder's embeddings are random, and pulling every anchor onto a synthetic positive that may
show another class (about 4 in 10 on the digits default) can collapse the contrastive loss before it has
learnt anything (observed with lambda 1.0). A linear ramp lets the base loss shape the space first.
"""

from __future__ import annotations

import math

from clsp.errors import UserError


def clsp_lambda_at(step: int, total_steps: int, lambda_max: float, ramp_steps: int) -> float:
    """lambda at optimiser step ``step``: 0 at step 0, linear to ``lambda_max`` at ``ramp_steps``, then constant.

    ``ramp_steps`` 0 is a constant ``lambda_max`` from the first step (METHOD.md). The ramp must fit in
    ``total_steps``, or the run would end before reaching the lambda it was configured with.
    """
    if not 0 <= ramp_steps <= total_steps:
        raise UserError(f"the lambda ramp must take between 0 and the run's {total_steps} steps, got {ramp_steps}")
    if lambda_max < 0:
        raise UserError(f"lambda must be >= 0, got {lambda_max}")
    if step < 0:
        raise UserError(f"step must be >= 0, got {step}")
    if step >= ramp_steps:
        return float(lambda_max)
    return lambda_max * step / ramp_steps


def cosine_momentum(base: float, end: float, progress: float) -> float:
    """EMA coefficient rising from ``base`` at the start to ``end`` at the end along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end - (end - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
