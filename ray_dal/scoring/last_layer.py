"""``scope="last"``: the final nn.Linear's per-sample gradient in closed form, one forward pass.

For logits ``z = W a + b`` and pseudo label ``y = argmax z``, ``dCE/dz = softmax(z) - onehot(y) =: e``,
so ``g_W = e a^T`` and ``g_b = e``: ``||g||^2 = ||e||^2 (||a||^2 + 1)`` and
``<g, G> = e . (G_W a + G_b)`` (bias terms only when the bias is trainable).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .params import final_linear


def last_layer_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    grad_sum: Mapping[str, torch.Tensor] | None,
    last: tuple[str, nn.Linear] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(||g||^2 [B], <g, G> [B] or None)`` over the final linear layer's trainable parameters.

    ``last``: ``final_linear(model)`` when the caller has it already.
    """
    prefix, layer = last or final_linear(model)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        handle.remove()
    if len(seen) != 1 or seen[0][1] is not logits or seen[0][0].dim() != 2:
        raise ValueError(
            f"scope='last' needs the model's output to be the output of its final nn.Linear '{prefix}' "
            f"called once on [B, in] features (it ran {len(seen)} time(s)"
            f"{'' if not seen or seen[0][1] is logits else ' and its output is not the logits'}); use scope='all'"
        )
    dtype = torch.promote_types(logits.dtype, torch.float32)
    a, z = seen[0][0].to(dtype), logits.to(dtype)
    e = torch.softmax(z, dim=1) - F.one_hot(z.argmax(dim=1), z.shape[1]).to(dtype)
    e_sq = e.pow(2).sum(1)
    has_w, has_b = layer.weight.requires_grad, layer.bias is not None and layer.bias.requires_grad
    sq = e_sq * (a.pow(2).sum(1) * has_w + has_b)
    if grad_sum is None:
        return sq, None
    bias = grad_sum[f"{prefix}.bias"].to(dtype) if has_b else None
    if has_w:
        projected = F.linear(a, grad_sum[f"{prefix}.weight"].to(dtype), bias)  # G_W a + G_b in one op
    else:
        projected = bias.expand_as(z)
    return sq, (e * projected).sum(1)
