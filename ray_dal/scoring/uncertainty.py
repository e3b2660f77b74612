"""Baseline acquisition scores on one footing with dynamic AL: larger score = query first.

All take logits ``[B, K]`` (any float dtype; computed in float32 or wider) and return ``[B]``.
"""

from __future__ import annotations

import numpy as np
import torch


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)


def least_confidence(logits: torch.Tensor) -> torch.Tensor:
    """1 - max_k p_k."""
    return 1.0 - _probs(logits).max(dim=1).values


def margin(logits: torch.Tensor) -> torch.Tensor:
    """-(p_top1 - p_top2): a small margin between the two likeliest classes scores high."""
    top2 = _probs(logits).topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """-sum_k p_k log p_k (nats)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def random_scores(ids: np.ndarray | torch.Tensor, seed: int) -> np.ndarray:
    """Uniform [0, 1) scores that depend only on (seed, id), never on batching or actor count.

    A SplitMix64 hash of the int64 id mixed with the seed: the same pool and seed give the same
    random query however the pool is split across scorers.
    """
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15) * (np.uint64(seed & 0xFFFFFFFF) + np.uint64(1))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
