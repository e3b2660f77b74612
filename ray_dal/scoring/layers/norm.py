"""Normalisation layers: per-sample gradients are small ([B, C]), so they are materialised.

With ``x_hat`` the normalised input and ``d`` the output gradient, the affine parameters get
``g_weight = sum_positions d * x_hat`` and ``g_bias = sum_positions d`` per sample.
BatchNorm must use running statistics (eval mode): batch statistics couple the samples of a batch,
so a per-sample gradient would not exist.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import Pair, accumulation_dtype, norm_and_dot


class BatchStatisticsError(ValueError):
    pass


def _affine(x_hat: torch.Tensor, d: torch.Tensor, reduce_dims: tuple[int, ...], names, grad_sum) -> Pair:
    B = d.shape[0]
    sq = torch.zeros(B, dtype=d.dtype, device=d.device)
    dot = None if grad_sum is None else torch.zeros_like(sq)
    for name in ("weight", "bias"):
        if name in names:
            per_sample = d * x_hat if name == "weight" else d
            if reduce_dims:  # note: Tensor.sum(()) would reduce every dim, batch included
                per_sample = per_sample.sum(reduce_dims)
            s, t = norm_and_dot(per_sample, None if grad_sum is None else grad_sum[name])
            sq += s
            if dot is not None:
                dot += t
    return sq, dot


def batchnorm(module: nn.modules.batchnorm._BatchNorm, x, d, names, grad_sum, method: str) -> Pair:
    if module.training or module.running_mean is None:
        raise BatchStatisticsError(
            f"{type(module).__name__} normalises with batch statistics (training mode or "
            "track_running_stats=False), which couples the samples of a batch: per-sample gradients do not "
            "exist. Score in eval mode with running statistics."
        )
    dtype = accumulation_dtype(d)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.to(dtype).reshape(shape)
    inv_std = torch.rsqrt(module.running_var.to(dtype).reshape(shape) + module.eps)
    x_hat = (x.to(dtype) - mean) * inv_std
    return _affine(x_hat, d.to(dtype), tuple(range(2, x.dim())), names, grad_sum)


def layernorm(module: nn.LayerNorm, x, d, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    x = x.to(dtype)
    norm_dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    var, mean = torch.var_mean(x, dim=norm_dims, unbiased=False, keepdim=True)
    x_hat = (x - mean) * torch.rsqrt(var + module.eps)
    return _affine(x_hat, d.to(dtype), tuple(range(1, norm_dims[0])), names, grad_sum)


def groupnorm(module: nn.GroupNorm, x, d, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B, C = x.shape[:2]
    grouped = x.to(dtype).reshape(B, module.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    x_hat = ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(x.shape)
    return _affine(x_hat, d.to(dtype), tuple(range(2, x.dim())), names, grad_sum)
