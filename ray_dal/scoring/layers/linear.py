"""nn.Linear: per-sample ``||g||^2`` and ``<g, G>`` from the layer input ``a`` and output gradient ``d``.

Inputs ``[B, *, in]``: the ``*`` dims are T positions that share the weight (T=1 for flat inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Pair, accumulation_dtype, ghost_sq, norm_and_dot, prefer_ghost, rowwise_dot


def linear(module: nn.Linear, x: torch.Tensor, d: torch.Tensor, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B = d.shape[0]
    a = x.to(dtype).reshape(B, -1, module.in_features)
    d = d.to(dtype).reshape(B, -1, module.out_features)
    sq = torch.zeros(B, dtype=dtype, device=d.device)
    dot = None if grad_sum is None else torch.zeros_like(sq)
    if "weight" in names:
        G = None if grad_sum is None else grad_sum["weight"].to(dtype)
        T = a.shape[1]
        if T == 1:  # rank-one per-sample gradient: ||d a^T||^2 = ||d||^2 ||a||^2
            sq += a[:, 0].pow(2).sum(1) * d[:, 0].pow(2).sum(1)
            if G is not None:
                dot += (d[:, 0] * F.linear(a[:, 0], G)).sum(1)
        elif prefer_ghost(T, module.in_features, module.out_features, method):
            sq += ghost_sq(a, d)
            if G is not None:
                dot += rowwise_dot(d, F.linear(a, G))
        else:
            s, t = norm_and_dot(torch.einsum("bto,bti->boi", d, a), G)
            sq += s
            if G is not None:
                dot += t
    if "bias" in names:
        s, t = norm_and_dot(d.sum(1), None if grad_sum is None else grad_sum["bias"])
        sq += s
        if dot is not None:
            dot += t
    return sq, dot
