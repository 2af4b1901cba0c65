"""Which of an anchor's k synthetic candidates becomes its positive at this load.

Not every candidate keeps its anchor's class (on the digits default about 4 in 10 show another digit), so
a policy can prefer the candidates that a score (``clsp.generate.scoring``) says agree with the anchor.
Every policy maps one uniform variate u in [0, 1) per anchor to a candidate index by an inverse CDF: the
training stream's precomputed per-(epoch, anchor) draws keep working unchanged, and ``uniform`` with the same
u picks exactly what the plain draw ``int(u * k)`` picked before policies existed.

    index = choose("top-m", scores, rng, m=2)                       # one call with a numpy Generator
    index = POSITIVE_CHOICES["top-m"](u, scores, k, m=2)            # or with draws the caller already has
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from clsp.errors import UserError

Policy = Callable[..., np.ndarray]


def _pick(u: np.ndarray, count: int | np.ndarray) -> np.ndarray:
    """floor(u * count), kept below count where rounding of u * count reaches it."""
    return np.minimum((u * count).astype(np.int64), np.asarray(count) - 1)


def uniform(u: np.ndarray, scores: np.ndarray | None, num_candidates: int) -> np.ndarray:
    """Any candidate with probability 1/k: METHOD.md's draw; scores are ignored."""
    return _pick(u, num_candidates)


def top_m(u: np.ndarray, scores: np.ndarray | None, num_candidates: int, m: int = 2) -> np.ndarray:
    """Uniform among the m highest-scored candidates (ties broken towards the lower index)."""
    scores = _require_scores(scores, "top-m")
    if not 1 <= m <= num_candidates:
        raise UserError(f"top-m needs 1 <= m <= k = {num_candidates}, got m = {m}")
    best = np.argsort(-scores, axis=-1, kind="stable")[..., :m]
    return np.take_along_axis(best, _pick(u, m)[..., None], axis=-1)[..., 0]


def score_weighted(u: np.ndarray, scores: np.ndarray | None, num_candidates: int, tau: float = 0.1) -> np.ndarray:
    """Candidate j with probability softmax(scores / tau)_j: a soft top-m; tau -> infinity is uniform."""
    scores = _require_scores(scores, "score-weighted")
    if not tau > 0:
        raise UserError(f"score-weighted needs a temperature tau > 0, got {tau}")
    logits = scores / tau
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(probabilities, axis=-1)
    below = (cdf <= (u * cdf[..., -1])[..., None]).sum(-1)
    return np.minimum(below, num_candidates - 1)


POSITIVE_CHOICES: dict[str, Policy] = {"uniform": uniform, "top-m": top_m, "score-weighted": score_weighted}


def _require_scores(scores: np.ndarray | None, policy: str) -> np.ndarray:
    if scores is None:
        raise UserError(f"the positive choice {policy!r} needs candidate scores; generate the shards with "
                        "scores or use 'uniform'")
    return np.asarray(scores, dtype=np.float64)


def choose(policy: str, scores: np.ndarray | None, rng: np.random.Generator, num_candidates: int | None = None,
           **params) -> np.ndarray:
    """Candidate indices, shape ``scores.shape[:-1]`` (one per anchor; ``()`` for one anchor without scores).

    ``scores`` is ``[..., k]`` or None (then ``num_candidates`` gives k); ``params`` go to the policy
    (``m`` for top-m, ``tau`` for score-weighted).
    """
    if policy not in POSITIVE_CHOICES:
        raise UserError(f"unknown positive choice {policy!r}; choose one of {', '.join(POSITIVE_CHOICES)}")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim < 1 or scores.shape[-1] < 1 or num_candidates not in (None, scores.shape[-1]):
            raise UserError(f"scores must be [..., k] with k = num_candidates, got shape {list(scores.shape)} "
                            f"and num_candidates {num_candidates}")
        num_candidates = scores.shape[-1]
    elif num_candidates is None or num_candidates < 1:
        raise UserError("without scores, pass num_candidates >= 1")
    shape = () if scores is None else scores.shape[:-1]
    return POSITIVE_CHOICES[policy](rng.random(shape), scores, num_candidates, **params)
