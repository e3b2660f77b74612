"""nn.Conv1d / Conv2d / Conv3d (any stride, padding and padding mode, dilation, groups).

Materialise: per-sample weight gradients come from one convolution weight-gradient with the batch
folded into the groups (input ``[1, B*C, ...]``, ``B*groups`` groups), about the cost of the
ordinary summed weight gradient and without an im2col copy. Narrow 1d/2d layers (<= 4 input channels
per group, e.g. an RGB stem) take ``d @ patches^T`` instead, a few samples at a time: oneDNN's grouped
kernel is 1.5-2x slower there (benchmarks/results/layer_choice.md).
Ghost (1d/2d): a convolution is a Linear over L positions of unfolded input patches ``u``, so
``||g||^2 = sum_{l,l'} (u_l.u_l')(d_l.d_l')`` per group, and ``<g, G> = sum(d * conv(x, G))``.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .common import Pair, accumulation_dtype, ghost_sq, grad_sums, materialised, prefer_ghost, rowwise_dot_, rowwise_sq

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
    groups, nd = module.groups, len(module.kernel_size)
    x, padding = _padded(module, x.to(dtype))
    d = d.to(dtype)
    G = grad_sums(grad_sum, names, dtype)
    bias = "bias" in names
    d_bias = d.flatten(2).sum(2) if bias else None  # [B, out]: the bias's per-sample gradient
    positions, fan_in = d[0, 0].numel(), module.weight[0].numel()
    if "weight" in names and nd <= 2 and prefer_ghost(positions, fan_in, module.out_channels // groups, method):
        sq = _ghost_sq(module, x, d, padding) + (rowwise_sq(d_bias) if bias else 0)
        if G is None:
            return sq, None
        # <g_W, G_W> + <g_b, G_b> = sum d * conv(x, G_W, G_b): the layer's own op on G
        conv_G = _CONV[nd](x, G["weight"], G.get("bias"), module.stride, padding, module.dilation, groups)
        return sq, rowwise_dot_(d, conv_G)
    per_sample = {"bias": d_bias} if bias else {}
    if "weight" in names:
        per_sample["weight"] = _per_sample_weight_grad(module, x, d, padding)
    return materialised(per_sample, G)


# Patch-matmul for layers with at most this many input channels per group, on chunks of about this many bytes
# of patches (a chunk that stays in cache: the whole batch's patches at B=256 made it 6x slower). A layer whose
# patches for one sample exceed a chunk (large images) keeps the grouped kernel: memory stays bounded.
NARROW_CHANNELS = 4
PATCH_CHUNK_BYTES = 2 << 20
_scratch = threading.local()


def takes_patches(module, x: torch.Tensor, d: torch.Tensor) -> bool:
    """Whether `_per_sample_weight_grad` forms ``module``'s per-sample gradients from patches (``x`` its input,
    ``d`` its output gradient): a 1d/2d layer with <= ``NARROW_CHANNELS`` input channels per group whose patches
    of one sample fit in ``PATCH_CHUNK_BYTES``."""
    if len(module.kernel_size) > 2 or module.in_channels // module.groups > NARROW_CHANNELS:
        return False
    return _patch_numel(module, d) * x.element_size() <= PATCH_CHUNK_BYTES


def _patch_numel(module, d) -> int:
    """Elements of one sample's patches: input channels x kernel area x output positions."""
    return module.in_channels * math.prod(module.kernel_size) * d[0, 0].numel()


def _per_sample_weight_grad(module, x, d, padding) -> torch.Tensor:
    """``[B, *weight.shape]``: the per-sample weight gradients (patches x output gradient for narrow layers,
    `takes_patches`, else a convolution weight-gradient whose groups are (sample, group))."""
    if takes_patches(module, x, d):
        return _patch_weight_grad(module, x, d, padding)
    B, nd = d.shape[0], len(module.kernel_size)
    shape = (B * module.out_channels, *module.weight.shape[1:])
    weight_shape_only = x.new_zeros(()).expand(shape)  # read for its shape alone: no memory
    grad = torch.ops.aten.convolution_backward(
        d.reshape(1, -1, *d.shape[2:]), x.reshape(1, -1, *x.shape[2:]), weight_shape_only, None,
        module.stride, padding, module.dilation, False, (0,) * nd, B * module.groups, (False, True, False),
    )[1]
    return grad.reshape(B, *module.weight.shape)


def _patch_weight_grad(module, x, d, padding) -> torch.Tensor:
    B, groups = d.shape[0], module.groups
    patch_numel, L = _patch_numel(module, d), d[0, 0].numel()
    x, d, geometry = _as_2d(module, x, d, padding)
    chunk = max(1, PATCH_CHUNK_BYTES // (patch_numel * x.element_size()))
    buffer = _patch_buffer(min(chunk, B) * patch_numel, x)
    out = []
    for xs, ds in zip(x.split(chunk), d.split(chunk)):
        n = xs.shape[0]
        U = _patches(xs, *geometry, out=buffer[: n * patch_numel]).view(n * groups, -1, L)  # [n*g, C/g*K, L]
        out.append(torch.bmm(ds.reshape(n * groups, -1, L), U.transpose(1, 2)))  # [n*g, O/g, C/g*K]
    return torch.cat(out).reshape(B, *module.weight.shape)


def _patch_buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer for patches. On CPU one per thread, dtype and device is kept: glibc hands a freed
    multi-MB block back to the OS, so a fresh one per call page-faults (1,000-8,600 faults a call on the
    cnn, which cost more than the patch-matmul saved)."""
    if like.device.type != "cpu":
        return like.new_empty(numel)  # the CUDA caching allocator reuses blocks itself
    key = (like.dtype, like.device)
    kept = getattr(_scratch, "buffers", None)
    if kept is None:
        kept = _scratch.buffers = {}
    if key not in kept or kept[key].numel() < numel:
        kept[key] = like.new_empty(numel)
    return kept[key][:numel]


def _ghost_sq(module, x, d, padding) -> torch.Tensor:
    B, groups = d.shape[0], module.groups
    x, d, geometry = _as_2d(module, x, d, padding)
    U = _patches(x, *geometry)
    U = U.reshape(B, groups, -1, U.shape[-1]).transpose(-1, -2)  # [B, g, L, C/g*K]
    D = d.reshape(B, groups, -1, U.shape[-2]).transpose(-1, -2)  # [B, g, L, O/g]
    return ghost_sq(U, D)


def _as_2d(module, x, d, padding):
    """``(padded x, d, (kernel, stride, dilation))`` of the equivalent unpadded 2d convolution (a Conv1d is a
    Conv2d of height 1)."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if len(kernel) == 1:
        x, d = x.unsqueeze(2), d.unsqueeze(2)
        kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
    if any(padding):
        x = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    return x, d, (kernel, stride, dilation)


def _patches(x: torch.Tensor, kernel, stride, dilation, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.unfold`` of an already padded ``[B, C, H, W]`` (``[B, C*kh*kw, L]``) via a strided view and one
    copy (into ``out``'s storage when given): several times faster than ``F.unfold``'s im2col on CPU."""
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    out_h, out_w = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    s = x.stride()
    view = x.as_strided((B, C, kh, kw, out_h, out_w), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw))
    if out is None:
        return view.reshape(B, C * kh * kw, out_h * out_w)
    return out.view(view.shape).copy_(view).view(B, C * kh * kw, out_h * out_w)
