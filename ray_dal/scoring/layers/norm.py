"""Normalisation layers: per-sample gradients are small ([B, C]), so they are materialised.

With ``x_hat`` the normalised input and ``d`` the output gradient, the affine parameters get
``g_weight = sum_positions d * x_hat`` and ``g_bias = sum_positions d`` per sample.
BatchNorm must use running statistics (eval mode): batch statistics couple the samples of a batch,
so a per-sample gradient would not exist.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import Pair, accumulation_dtype, materialised


class BatchStatisticsError(ValueError):
    pass


def _affine(centered: torch.Tensor, inv_std: torch.Tensor, d: torch.Tensor, names, grad_sum) -> Pair:
    """Terms of ``weight`` (``g = sum_positions d * centered * inv_std``) and ``bias`` (``g = sum_positions d``).

    ``centered`` and ``d`` are ``[B, C, S]`` (S positions per channel), ``inv_std`` broadcasts to ``[B, C]``.
    ``centered`` is overwritten (the callers' own temporary: a fresh product per call page-faults on CPU).
    """
    per_sample = {}
    if "weight" in names:
        per_sample["weight"] = centered.mul_(d).sum(2).mul_(inv_std)
    if "bias" in names:
        per_sample["bias"] = d.sum(2)
    return materialised(per_sample, grad_sum)


def batchnorm(module: nn.modules.batchnorm._BatchNorm, x, d, names, grad_sum, method: str) -> Pair:
    if module.training or module.running_mean is None:
        raise BatchStatisticsError(
            f"{type(module).__name__} normalises with batch statistics (training mode or "
            "track_running_stats=False), which couples the samples of a batch: per-sample gradients do not "
            "exist. Score in eval mode with running statistics."
        )
    dtype = accumulation_dtype(d)
    B, C = x.shape[:2]
    centered = x.to(dtype).reshape(B, C, -1) - module.running_mean.to(dtype).reshape(1, C, 1)
    inv_std = torch.rsqrt(module.running_var.to(dtype) + module.eps)
    return _affine(centered, inv_std, d.to(dtype).reshape(B, C, -1), names, grad_sum)


def layernorm(module: nn.LayerNorm, x, d, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B = x.shape[0]
    x = x.to(dtype).reshape(B, -1, math.prod(module.normalized_shape))
    var, mean = torch.var_mean(x, dim=2, unbiased=False, keepdim=True)
    x_hat = (x - mean) * torch.rsqrt(var + module.eps)  # [B, S, features]: features act as channels
    d = d.to(dtype).reshape(x.shape)
    return _affine(x_hat.transpose(1, 2), torch.ones((), dtype=dtype, device=d.device), d.transpose(1, 2),
                   names, grad_sum)


def groupnorm(module: nn.GroupNorm, x, d, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B, C = x.shape[:2]
    grouped = x.to(dtype).reshape(B, module.num_groups, -1)
    var, mean = torch.var_mean(grouped, dim=2, unbiased=False, keepdim=True)
    x_hat = ((grouped - mean) * torch.rsqrt(var + module.eps)).reshape(B, C, -1)
    return _affine(x_hat, torch.ones((), dtype=dtype, device=d.device), d.to(dtype).reshape(B, C, -1),
                   names, grad_sum)
