"""Per-layer handlers of the scoring engine: one small file per layer family.

A handler ``fn(module, input, grad_output, names, grad_sum, method) -> (sq [B], dot [B] | None)``
returns one layer's share of each sample's ``||g||^2`` and ``<g, G>`` for the trainable parameters
in ``names`` (local names such as "weight", "bias"); ``grad_sum`` maps those names to G's tensors
(None: no dot product wanted). Modules of other types, and subclasses that override ``forward``,
have no handler: the engine scores their parameters on its exact generic path. `handler_for`'s
handlers run with autocast off, so their reductions stay in float32 or wider under AMP (autocast
would otherwise run their matmuls in bfloat16/float16).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .common import METHODS, prefer_ghost
from .conv import conv
from .embedding import FrequencyScaledEmbeddingError, embedding
from .linear import linear
from .norm import BatchStatisticsError, batchnorm, groupnorm, layernorm

HANDLERS: dict[type[nn.Module], Callable] = {
    nn.Linear: linear,
    nn.Conv1d: conv,
    nn.Conv2d: conv,
    nn.Conv3d: conv,
    nn.BatchNorm1d: batchnorm,
    nn.BatchNorm2d: batchnorm,
    nn.LayerNorm: layernorm,
    nn.GroupNorm: groupnorm,
    nn.Embedding: embedding,
}

LAYER_ERRORS = (BatchStatisticsError, FrequencyScaledEmbeddingError)


def handler_for(module: nn.Module) -> Callable | None:
    """The handler for ``module``'s type, or None if the type (or an overridden ``forward``) is not covered."""
    for cls in type(module).__mro__:
        if cls in HANDLERS:
            return _without_autocast(HANDLERS[cls]) if type(module).forward is cls.forward else None
    return None


@functools.cache
def _without_autocast(handler: Callable) -> Callable:
    @functools.wraps(handler)
    def run(module, x, grad, *args):
        with torch.autocast(grad.device.type, enabled=False):
            return handler(module, x, grad, *args)

    return run


__all__ = ["HANDLERS", "LAYER_ERRORS", "METHODS", "handler_for", "prefer_ghost"]
