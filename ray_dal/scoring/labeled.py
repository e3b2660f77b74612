"""G: the summed gradient of the labeled set, the second term's anchor in the dynamic score."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .modes import eval_mode
from .params import scoped_parameters

Batch = tuple[torch.Tensor, torch.Tensor]


def labeled_gradient(
    model: nn.Module, batches: Iterable[Batch] | Batch, scope: str = "all"
) -> dict[str, torch.Tensor]:
    """G = sum over (x, y) of grad_theta CE(f(x), y), true labels, eval mode, summed (not averaged).

    ``batches`` is an iterable of ``(inputs, labels)`` or a single such tuple of tensors. Returns a
    dict keyed like ``model.named_parameters()`` (trainable parameters in ``scope`` only), each tensor
    on the parameter's device in float32 or wider. An empty iterable gives zeros. ``.grad`` and the
    model's modes are left as they were.
    """
    if isinstance(batches, tuple) and len(batches) == 2 and all(isinstance(t, torch.Tensor) for t in batches):
        batches = [batches]
    params = scoped_parameters(model, scope)
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for n, p in params.items()}
    with eval_mode(model), torch.enable_grad():
        for inputs, labels in batches:
            logits = model(inputs)
            loss = F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits,
                                   labels.to(logits.device).long(), reduction="sum")
            for n, g in zip(names, torch.autograd.grad(loss, tensors, allow_unused=True)):
                if g is not None:
                    total[n] += g.to(total[n].dtype)
    return total
