"""Which of an anchor's k synthetic candidates becomes its positive at this load, and how much it counts.

Not every candidate keeps its anchor's class (on the digits default about 4 in 10 show another digit), so
a policy can prefer the candidates that a score (``clsp.generate.scoring``) says agree with the anchor.
Every policy maps one uniform variate u in [0, 1) per anchor to a candidate index by an inverse CDF: the
training stream's precomputed per-(epoch, anchor) draws keep working unchanged, and ``uniform`` with the same
u picks exactly what the plain draw ``int(u * k)`` picked before policies existed.

    index = choose("top-m", scores, rng, m=2)                       # one call with a numpy Generator
    index = POSITIVE_CHOICES["top-m"](u, scores, k, m=2)            # or with draws the caller already has
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

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


@torch.no_grad()
def hardest_agreeing(anchor_embeddings: torch.Tensor, candidate_embeddings: torch.Tensor,
                     threshold: float = 0.5) -> torch.Tensor:
    """Per anchor, the candidate the current encoder finds hardest while it still agrees with the anchor.

    Among the candidates whose cosine to the anchor is at least ``threshold`` the least similar one (the
    hardest positive that plausibly keeps the anchor's content); where none reaches it, the most similar
    one. Embeddings are ``[n, d]`` and ``[n, k, d]``; returns ``[n]`` indices.
    """
    if anchor_embeddings.ndim != 2 or candidate_embeddings.ndim != 3 \
            or candidate_embeddings.shape[0::2] != anchor_embeddings.shape:
        raise UserError(f"embeddings must be [n, d] and [n, k, d], got {list(anchor_embeddings.shape)} and "
                        f"{list(candidate_embeddings.shape)}")
    cosine = F.cosine_similarity(candidate_embeddings, anchor_embeddings[:, None], dim=-1)
    agreeing = cosine >= threshold
    hardest = cosine.masked_fill(~agreeing, float("inf")).argmin(-1)
    return torch.where(agreeing.any(-1), hardest, cosine.argmax(-1))


def score_loss_weights(scores: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Weights of the positives' CLSP terms, ``[n]`` with mean 1: batch size x softmax(scores / tau).

    A positive that agrees less with its anchor pulls less; mean 1 keeps lambda's meaning, and tau ->
    infinity gives today's equal weights. Use as ``lambda * mean(weights * ||z1 - z3||^2)``.
    """
    if scores.ndim != 1 or scores.numel() < 1:
        raise UserError(f"scores must be [n] (one per chosen positive), got {list(scores.shape)}")
    if not tau > 0:
        raise UserError(f"the loss-weight temperature tau must be > 0, got {tau}")
    return torch.softmax(scores.float() / tau, dim=0) * scores.numel()
