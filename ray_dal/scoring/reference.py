"""Slow, obviously-correct oracles for the dynamic score: the yardsticks of tests and benchmarks.

- `loop_scores`: one autograd backward per sample (run it in float64 to check the fast engine).
- `vmap_scores`: ``torch.func.vmap(grad(...))`` per-sample gradients, then norm and dot.

Both follow the engine's contract: eval mode, argmax pseudo labels, ``reduction="sum"`` CE, and
score = ||g||^2 + gamma <g, G> (``gamma=inf``: <g, G> alone). Neither touches ``.grad``; both restore
the model's mode.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .modes import eval_mode
from .params import check_grad_sum, scoped_parameters


def combine(sq_norm: torch.Tensor, dot: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """score = ||g||^2 + gamma <g, G>; gamma = inf gives <g, G> alone; gamma = 0 ignores ``dot``."""
    if math.isinf(gamma):
        if gamma < 0:
            raise ValueError("gamma = -inf is not a score; use gamma=float('inf') for the influence variant")
        return dot
    if gamma == 0:
        return sq_norm
    return sq_norm + gamma * dot


def loop_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    grad_sum: Mapping[str, torch.Tensor] | None,
    gamma: float = 2.0,
    scope: str = "all",
) -> torch.Tensor:
    """Per-sample autograd loop. Returns ``[B]`` in the model's dtype."""
    params = scoped_parameters(model, scope)
    if gamma != 0:
        check_grad_sum(params, grad_sum)
    names, tensors = list(params), list(params.values())
    scores = []
    with eval_mode(model), torch.enable_grad():
        for i in range(inputs.shape[0]):
            logits = model(inputs[i : i + 1])
            label = logits.detach().argmax(dim=1)
            grads = torch.autograd.grad(F.cross_entropy(logits, label, reduction="sum"), tensors, allow_unused=True)
            grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]
            sq = sum((g * g).sum() for g in grads)
            dot = None if gamma == 0 else sum((g * grad_sum[n].to(g)).sum() for n, g in zip(names, grads))
            scores.append(combine(sq, dot, gamma))
    return torch.stack(scores).detach()


def per_sample_norm_and_dot(
    model: nn.Module,
    inputs: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    grad_sum: Mapping[str, torch.Tensor] | None,
    chunk_size: int | None = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``||g||^2`` and ``<g, G>`` over ``params`` only (a subset of the model's, by full name), via
    ``torch.func.vmap(grad(...))``; memory ``chunk_size x P``. The model must already be in eval mode."""
    from torch.func import functional_call, grad, vmap

    detached = {n: p.detach() for n, p in params.items()}

    def loss(p, x):
        logits = functional_call(model, p, (x.unsqueeze(0),))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="sum")

    with torch.no_grad():
        per_sample = vmap(grad(loss), in_dims=(None, 0), chunk_size=chunk_size)(detached, inputs)
    sq = sum((g * g).flatten(1).sum(1) for g in per_sample.values())
    dot = None
    if grad_sum is not None:
        dot = sum((g * grad_sum[n].to(g)).flatten(1).sum(1) for n, g in per_sample.items())
    return sq, dot


def vmap_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    grad_sum: Mapping[str, torch.Tensor] | None,
    gamma: float = 2.0,
    scope: str = "all",
    chunk_size: int | None = 16,
) -> torch.Tensor:
    """``torch.func`` per-sample gradients (memory ``chunk_size x P``), then norm and dot. Returns ``[B]``."""
    params = scoped_parameters(model, scope)
    if gamma != 0:
        check_grad_sum(params, grad_sum)
    with eval_mode(model):
        sq, dot = per_sample_norm_and_dot(model, inputs, params, grad_sum if gamma != 0 else None, chunk_size)
    return combine(sq, dot, gamma).detach()


def loop_labeled_gradient(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, scope: str = "all"
) -> dict[str, torch.Tensor]:
    """G summed one sample at a time (oracle for `labeled_gradient`)."""
    params = scoped_parameters(model, scope)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    with eval_mode(model), torch.enable_grad():
        for i in range(inputs.shape[0]):
            loss = F.cross_entropy(model(inputs[i : i + 1]), labels[i : i + 1], reduction="sum")
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
                if g is not None:
                    total[n] += g
    return total
