"""What the diversity baselines measure a sample by, from one forward pass.

For a classifier whose last layer is ``logits = W a + c`` (``a``: the penultimate features, d wide),
the cross-entropy gradient with respect to W at the pseudo label ``argmax logits`` is the outer product
``e a^T`` with ``e = softmax(logits) - onehot(argmax)`` (K wide). Coreset uses ``a``; BADGE uses the
K x d gradient embedding, which `ray_dal.selection.kmeanspp` handles through (e, a) alone:
``<e_i a_i^T, e_j a_j^T> = (e_i . e_j)(a_i . a_j)``. As in BADGE's code, the bias gradient (= e) is not
part of the embedding; the sign (BADGE uses onehot - softmax) does not change any distance.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scoring.modes import eval_mode
from ..scoring.params import final_linear


def embedding_parts(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a [B, d], e [B, K])`` in float32 or wider, in eval mode (the model's modes are restored).

    ``a`` is the input of the model's last ``nn.Linear`` (`ray_dal.scoring.final_linear`) flattened per
    sample; ``e`` is softmax minus the one-hot argmax.
    """
    _, layer = final_linear(model)
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with eval_mode(model), torch.inference_mode():
            logits = model(x)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"the model called its last nn.Linear {len(seen)} times in one forward; embeddings need "
                         "exactly one call")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    a = seen[0].reshape(len(x), -1).to(dtype)
    probs = torch.softmax(logits.to(dtype), dim=1)
    e = probs - nn.functional.one_hot(probs.argmax(dim=1), probs.shape[1]).to(dtype)
    return a, e
