"""Shared reductions for per-layer handlers.

Every handler returns this layer's share of one sample's ``||g||^2`` and ``<g, G>``: float tensors
``[B]`` (``dot`` is None when no G is given). Reductions run in float32 or wider, whatever the
activations' dtype (autocast-safe).
"""

from __future__ import annotations

import torch

Pair = tuple[torch.Tensor, "torch.Tensor | None"]

# Per-sample weight gradients with T positions (T=1: a plain matrix-vector layer) can be reduced two ways:
#   materialise: g_b = sum_t d_t a_t^T, then ||g_b||^2 and <g_b, G>     ~ T*in*out flops, B*in*out memory
#   ghost norm:  ||g_b||^2 = sum_{t,t'} (a_t.a_t')(d_t.d_t')            ~ T^2*(in+out) flops, B*T^2 memory
#                <g_b, G>  = sum_t d_t . (G a_t)  (the layer's own op)   ~ T*in*out flops
# Ghost is chosen when its norm is cheaper, T*(in+out) < in*out (profiled on ResNet18/VGG11: the
# 128-channel 16x16 convolutions are 3x faster materialised, the 256/512-channel ones ghosted).
METHODS = ("auto", "ghost", "materialize")


def prefer_ghost(positions: int, fan_in: int, fan_out: int, method: str) -> bool:
    """Ghost norm when ``T (fan_in + fan_out) < fan_in * fan_out`` (``method`` forces "ghost"/"materialize")."""
    if method == "ghost":
        return True
    if method == "materialize":
        return False
    return positions * (fan_in + fan_out) < fan_in * fan_out


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def rowwise_sq(a: torch.Tensor) -> torch.Tensor:
    """``[B]``: sum over all but the first dim of ``a * a``, without a temporary."""
    return torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1).square()


def rowwise_dot_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B]``: sum over all but the first dim of ``a * b``, computed in ``b``'s memory (``b``, of ``a``'s shape,
    is overwritten: pass a temporary). A fresh product, or a batched matmul, is 3-7x slower on CPU."""
    return b.mul_(a).reshape(b.shape[0], -1).sum(1)


def norm_and_dot(per_sample: torch.Tensor, grad_sum: torch.Tensor | None) -> Pair:
    """``||g_b||^2`` and ``<g_b, G>`` for materialised per-sample gradients ``[B, *param_shape]``."""
    flat = per_sample.flatten(1)
    return rowwise_sq(flat), None if grad_sum is None else flat @ grad_sum.reshape(-1).to(flat.dtype)


def grad_sums(grad_sum, names, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """G's tensors for the scored ``names``, in ``dtype`` (None when no G is given)."""
    return None if grad_sum is None else {n: grad_sum[n].to(dtype) for n in names}


def materialised(per_sample: dict[str, torch.Tensor], grad_sum) -> Pair:
    """Summed `norm_and_dot` terms of named per-sample gradients ``{name: [B, *shape]}`` (``grad_sum`` keyed
    alike, or None)."""
    sq, dot = 0, 0
    for name, g in per_sample.items():
        s, t = norm_and_dot(g, None if grad_sum is None else grad_sum[name])
        sq, dot = sq + s, None if t is None else dot + t
    return sq, dot


def ghost_sq(a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_{t,t'} (a_t.a_t')(d_t.d_t') for ``a [B, T, in]``, ``d [B, T, out]`` (leading dims batched)."""
    return rowwise_dot_(a @ a.transpose(-1, -2), d @ d.transpose(-1, -2))
