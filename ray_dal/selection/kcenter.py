"""Coreset's greedy k-center (Sener & Savarese 2018; BADGE's ``furthest_first``).

Each step picks the candidate furthest from its nearest centre, then makes it a centre. Memory: the
candidates themselves (N x d) plus O(N) distances and one O(chunk x M) block; time O((M + b) N d).
"""

from __future__ import annotations

import torch

_BLOCK = 1 << 22  # elements of one candidates x centres distance block


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` squared Euclidean distances of the rows of ``x`` [N, d] and ``y`` [M, d] (>= 0)."""
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1) - 2.0 * (x @ y.T)
    return d2.clamp_min_(0.0)


def nearest_centre_distances(candidates: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[N]`` squared distance of each candidate to its nearest centre; +inf when there is no centre."""
    out = torch.full((len(candidates),), float("inf"), dtype=candidates.dtype, device=candidates.device)
    if len(centres) == 0:
        return out
    rows = max(1, _BLOCK // len(centres))
    for start in range(0, len(candidates), rows):
        block = squared_distances(candidates[start:start + rows], centres)
        out[start:start + rows] = block.min(dim=1).values
    return out


def k_center_greedy(candidates: torch.Tensor, centres: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``b`` rows of ``candidates`` [N, d] by greedy k-center, starting from ``centres`` [M, d] (M >= 0).

    Returns ``(indices [b], squared distance of each pick to its nearest centre when picked [b])``.
    Ties go to the smaller index; with no centres the first pick is index 0. Any float dtype/device;
    distances are computed in the inputs' dtype.
    """
    if candidates.ndim != 2 or centres.ndim != 2 or (len(centres) and centres.shape[1] != candidates.shape[1]):
        raise ValueError(f"candidates [N, d] and centres [M, d] must share d; got {tuple(candidates.shape)} and "
                         f"{tuple(centres.shape)}")
    if not 1 <= b <= len(candidates):
        raise ValueError(f"b = {b} must be in [1, {len(candidates)}] (the number of candidates)")
    centres = centres.to(candidates.dtype)
    nearest = nearest_centre_distances(candidates, centres)
    picks = torch.empty(b, dtype=torch.long)
    gaps = torch.empty(b, dtype=candidates.dtype)
    for k in range(b):
        i = int(nearest.argmax())  # the first maximum: ties go to the smaller index
        picks[k], gaps[k] = i, nearest[i]
        nearest = torch.minimum(nearest, squared_distances(candidates, candidates[i:i + 1]).squeeze(1))
        nearest[i] = -1.0  # never picked twice, even among exact duplicates
    return picks, gaps
