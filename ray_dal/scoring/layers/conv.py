"""nn.Conv1d / Conv2d / Conv3d (any stride, padding and padding mode, dilation, groups).

Materialise: per-sample weight gradients come from one convolution weight-gradient with the batch
folded into the groups (input ``[1, B*C, ...]``, ``B*groups`` groups), about the cost of the
ordinary summed weight gradient and without an im2col copy.
Ghost (1d/2d): a convolution is a Linear over L positions of unfolded input patches ``u``, so
``||g||^2 = sum_{l,l'} (u_l.u_l')(d_l.d_l')`` per group, and ``<g, G> = sum(d * conv(x, G))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Pair, accumulation_dtype, ghost_sq, norm_and_dot, prefer_ghost, rowwise_dot

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _padded(module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(x, padding)`` such that a zero-padded convolution with ``padding`` equals the module's."""
    nd = len(module.kernel_size)
    if not isinstance(module.padding, str) and module.padding_mode == "zeros":
        return x, tuple(module.padding)
    if module.padding == "valid":
        pads = [0, 0] * nd
    elif isinstance(module.padding, str):  # "same": extra padding goes to the end, as torch does
        pads = []
        for k, dl in zip(reversed(module.kernel_size), reversed(module.dilation)):
            pads += [dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2]
    else:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode), (0,) * nd


def conv(module: nn.modules.conv._ConvNd, x: torch.Tensor, d: torch.Tensor, names, grad_sum, method: str) -> Pair:
    dtype = accumulation_dtype(d)
    B, groups, nd = d.shape[0], module.groups, len(module.kernel_size)
    x, padding = _padded(module, x.to(dtype))
    d = d.to(dtype)
    sq = torch.zeros(B, dtype=dtype, device=d.device)
    dot = None if grad_sum is None else torch.zeros_like(sq)
    if "weight" in names:
        G = None if grad_sum is None else grad_sum["weight"].to(dtype)
        out_per_group, positions = module.out_channels // groups, d[0, 0].numel()
        fan_in = module.weight[0].numel()
        if nd <= 2 and prefer_ghost(positions, fan_in, out_per_group, method):
            sq += _ghost_sq(module, x, d, padding)
            if G is not None:
                conv_G = _CONV[nd](x, G, None, module.stride, padding, module.dilation, groups)
                dot += rowwise_dot(d, conv_G)
        else:
            s, t = norm_and_dot(_per_sample_weight_grad(module, x, d, padding), G)
            sq += s
            if G is not None:
                dot += t
    if "bias" in names:
        s, t = norm_and_dot(d.flatten(2).sum(2), None if grad_sum is None else grad_sum["bias"])
        sq += s
        if dot is not None:
            dot += t
    return sq, dot


def _per_sample_weight_grad(module, x, d, padding) -> torch.Tensor:
    """``[B, *weight.shape]``: the weight gradient of a convolution whose groups are (sample, group)."""
    B, nd = d.shape[0], len(module.kernel_size)
    shape = (B * module.out_channels, *module.weight.shape[1:])
    weight_shape_only = x.new_zeros(()).expand(shape)  # read for its shape alone: no memory
    grad = torch.ops.aten.convolution_backward(
        d.reshape(1, -1, *d.shape[2:]), x.reshape(1, -1, *x.shape[2:]), weight_shape_only, None,
        module.stride, padding, module.dilation, False, (0,) * nd, B * module.groups, (False, True, False),
    )[1]
    return grad.reshape(B, *module.weight.shape)


def _ghost_sq(module, x, d, padding) -> torch.Tensor:
    B, groups = d.shape[0], module.groups
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if len(kernel) == 1:  # a Conv1d is a Conv2d of height 1
        x, d = x.unsqueeze(2), d.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    U = _patches(F.pad(x, [p for p in reversed(padding) for _ in range(2)]), kernel, stride, dilation)
    U = U.reshape(B, groups, -1, U.shape[-1]).transpose(-1, -2)  # [B, g, L, C/g*K]
    D = d.reshape(B, groups, -1, U.shape[-2]).transpose(-1, -2)  # [B, g, L, O/g]
    return ghost_sq(U, D)


def _patches(x: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """``F.unfold`` of an already padded ``[B, C, H, W]`` (``[B, C*kh*kw, L]``) via a strided view and one
    copy: several times faster than ``F.unfold``'s im2col on CPU."""
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h, out_w = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    view = x.as_strided((B, C, kh, kw, out_h, out_w), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    return view.reshape(B, C * kh * kw, out_h * out_w)
