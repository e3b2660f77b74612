"""nn.Linear: per-sample ``||g||^2`` and ``<g, G>`` from the layer input ``a`` and output gradient ``d``.

Inputs ``[B, *, in]``: the ``*`` dims are T positions that share the weight (T=1 for flat inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Pair, accumulation_dtype, ghost_sq, grad_sums, materialised, prefer_ghost, rowwise_dot_, rowwise_sq


def linear(module: nn.Linear, x: torch.Tensor, d: torch.Tensor, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B = d.shape[0]
    a = x.to(dtype).reshape(B, -1, module.in_features)
    d = d.to(dtype).reshape(B, -1, module.out_features)
    G = grad_sums(grad_sum, names, dtype)
    T = a.shape[1]
    bias = "bias" in names
    d_bias = d[:, 0] if T == 1 else d.sum(1) if bias else None  # [B, out]: the bias's per-sample gradient
    if "weight" in names and (T == 1 or prefer_ghost(T, module.in_features, module.out_features, method)):
        if T == 1:  # rank-one per-sample gradient: ||d a^T||^2 = ||d||^2 ||a||^2
            d_sq = rowwise_sq(d_bias)
            sq = rowwise_sq(a) * d_sq + (d_sq if bias else 0)
        else:
            sq = ghost_sq(a, d) + (rowwise_sq(d_bias) if bias else 0)
        # <g_W, G_W> + <g_b, G_b> = sum_t d_t . (G_W a_t + G_b): the layer's own op on G
        return sq, None if G is None else rowwise_dot_(d, F.linear(a, G["weight"], G.get("bias")))
    per_sample = {"bias": d_bias} if bias else {}
    if "weight" in names:
        per_sample["weight"] = torch.einsum("bto,bti->boi", d, a)
    return materialised(per_sample, G)
