"""nn.Embedding: the per-sample weight gradient scatters output gradients into the looked-up rows.

Rows looked up several times by one sample add up before the norm, so positions are grouped by
(sample, index) with a sort, never materialising a [B, num_embeddings, dim] tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Pair, accumulation_dtype


class FrequencyScaledEmbeddingError(ValueError):
    pass


def embedding(module: nn.Embedding, idx: torch.Tensor, d: torch.Tensor, names, grad_sum, method: str) -> Pair:
    if module.scale_grad_by_freq:
        raise FrequencyScaledEmbeddingError(
            "nn.Embedding(scale_grad_by_freq=True) scales gradients by word counts over the whole batch, "
            "which couples samples: per-sample gradients are not defined"
        )
    dtype = accumulation_dtype(d)
    B = d.shape[0]
    idx = idx.reshape(B, -1)
    d = d.to(dtype).reshape(B, idx.shape[1], module.embedding_dim)
    if module.padding_idx is not None:  # the padding row never receives gradient
        d = d * (idx != module.padding_idx).unsqueeze(-1).to(dtype)
    sq = torch.zeros(B, dtype=dtype, device=d.device)
    dot = None if grad_sum is None else torch.zeros_like(sq)
    if "weight" in names:
        sample = torch.arange(B, device=idx.device).unsqueeze(1).expand_as(idx)
        keys = (sample * module.num_embeddings + idx).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(unique.numel(), module.embedding_dim, dtype=dtype, device=d.device)
        rows.index_add_(0, inverse, d.reshape(-1, module.embedding_dim))
        sq.index_add_(0, unique // module.num_embeddings, rows.pow(2).sum(1))
        if grad_sum is not None:
            dot += (d * F.embedding(idx, grad_sum["weight"].to(dtype))).flatten(1).sum(1)
    return sq, dot
