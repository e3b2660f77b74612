"""BADGE's k-means++ seeding (Ash et al. 2020) on gradient embeddings that are never materialised.

Sample i's embedding is the K x d outer product ``g_i = e_i a_i^T`` (`ray_dal.selection.embeddings`), so

    ||g_i - g_j||^2 = ||e_i||^2 ||a_i||^2 + ||e_j||^2 ||a_j||^2 - 2 (e_i . e_j)(a_i . a_j)

costs O(K + d) instead of O(K d). Memory: N x (K + d) for the candidates (BADGE's code holds N x K d),
time O(b N (K + d)). Seeding as BADGE's ``init_centers``: the first centre is the sample with the
largest gradient norm; each next one is drawn with probability proportional to its squared distance
to the nearest centre chosen so far.
"""

from __future__ import annotations

import numpy as np
import torch


def _distances_to(a: torch.Tensor, e: torch.Tensor, norms: torch.Tensor, j: int) -> torch.Tensor:
    d2 = norms + norms[j] - 2.0 * (e @ e[j]) * (a @ a[j])
    return d2.clamp_min_(0.0)


def draw_proportional(weights: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability ``weights / weights.sum()`` (float64, >= 0, positive sum)."""
    cumulative = np.cumsum(weights)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(weights) - 1))


def kmeans_pp_seeding(a: torch.Tensor, e: torch.Tensor, b: int, rng: np.random.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``b`` of the N samples with factorised embeddings ``a`` [N, d], ``e`` [N, K].

    Returns ``(indices [b], squared distance of each pick to the nearest earlier pick [b])`` (the first
    pick's entry is its squared norm). Draws use ``rng`` only, so a seed fixes the picks. When every
    sample left coincides with a chosen one (all distances 0), the next pick is the first unchosen index.
    """
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"a [N, d] and e [N, K] must have the same N; got {tuple(a.shape)} and {tuple(e.shape)}")
    if not 1 <= b <= len(a):
        raise ValueError(f"b = {b} must be in [1, {len(a)}] (the number of candidates)")
    e = e.to(a.dtype)
    norms = (a * a).sum(1) * (e * e).sum(1)
    first = int(norms.argmax())
    picks, gaps = [first], [float(norms[first])]
    nearest = _distances_to(a, e, norms, first)
    chosen = torch.zeros(len(a), dtype=torch.bool)
    chosen[first] = True
    while len(picks) < b:
        weights = nearest.masked_fill(chosen, 0.0).double().cpu().numpy()
        if weights.sum() > 0:
            j = draw_proportional(weights, rng)
        else:
            j = int((~chosen).nonzero()[0])
        picks.append(j)
        gaps.append(float(nearest[j]))
        chosen[j] = True
        nearest = torch.minimum(nearest, _distances_to(a, e, norms, j))
    return torch.tensor(picks, dtype=torch.long), torch.tensor(gaps, dtype=torch.float64)
