"""The dynamic score, exactly and fast: s(x) = ||g_x||^2 + gamma <g_x, G>.

``g_x = grad_theta CE(f(x), argmax f(x))`` with the model in eval mode. For ``scope="all"`` one
forward and one backward pass (activation gradients only, no weight gradients) are run; per-layer
hooks reduce each layer's share of ``||g_x||^2`` and ``<g_x, G>`` as soon as its output gradient is
known (see ``layers/``), so memory grows with batch size times the largest layer.

Exactness guards. A parameter is scored by its layer's fast handler only if its module has a
handler, ran exactly once, its output gradient reached the handler, and the loss's autograd graph
holds no other op that uses the parameter (tied weights, a parent using a child's weight
functionally). Every other parameter that the loss depends on is scored on an exact generic path:
``torch.func`` per-sample gradients of just those parameters. If that path cannot run,
`UnsupportedModelError` names the parameters. No parameter is ever silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import get_gradient_edge

from .last_layer import last_layer_scores
from .layers import LAYER_ERRORS, METHODS, handler_for
from .modes import eval_mode
from .params import check_grad_sum, final_linear, scoped_parameters
from .reference import combine, per_sample_norm_and_dot


class UnsupportedModelError(ValueError):
    """The model holds a trainable parameter the engine cannot score exactly."""


def dynamic_scores(
    model: nn.Module,
    inputs: torch.Tensor,
    grad_sum: Mapping[str, torch.Tensor] | None,
    gamma: float = 2.0,
    scope: str = "all",
    *,
    layer_method: str = "auto",
) -> torch.Tensor:
    """Training-dynamics scores of a batch: ``||g_x||^2 + gamma <g_x, G>``, shape ``[B]``.

    Args:
        model: maps ``inputs`` ``[B, ...]`` to logits ``[B, K]``; scored in eval mode, modes restored.
        grad_sum: G from `labeled_gradient` with the same ``scope`` (ignored, may be None, if gamma == 0).
        gamma: any float >= 0; ``float("inf")`` returns ``<g_x, G>`` alone (influence variant).
        scope: "all" trainable parameters, or "last" (the final nn.Linear, closed form, one forward).
        layer_method: "auto" (cheaper per layer), or force "ghost" / "materialize" (tests, benchmarks).

    Returns float32 scores (float64 for a float64 model) on the inputs' device, detached. The
    parameters' ``.grad`` are never touched.
    """
    gamma = float(gamma)
    if math.isnan(gamma) or gamma < 0:
        raise ValueError(f"gamma must be >= 0 (or float('inf') for <g, G> alone), got {gamma}")
    if layer_method not in METHODS:
        raise ValueError(f"layer_method must be one of {METHODS}, got {layer_method!r}")
    last = final_linear(model) if scope == "last" else None
    params = scoped_parameters(model, scope, last)
    if gamma != 0:
        check_grad_sum(params, grad_sum)
    G = grad_sum if gamma != 0 else None
    with eval_mode(model):
        if scope == "last":
            sq, dot = last_layer_scores(model, inputs, G, last)
        else:
            sq, dot, _ = _all_parameter_terms(model, inputs, params, G, layer_method)
    return combine(sq, dot, gamma).detach()


def generic_path_parameters(model: nn.Module, inputs: torch.Tensor) -> list[str]:
    """Names of the trainable parameters that ``scope="all"`` scoring of ``inputs`` cannot give to a
    fast layer handler and scores on the slower generic (torch.func) path. Empty for the built-in models."""
    with eval_mode(model):
        return _all_parameter_terms(model, inputs, scoped_parameters(model, "all"), None, "auto")[2]


@dataclass
class _Layer:
    """A module scored by a fast handler, and what one forward and backward pass recorded about it."""

    module: nn.Module
    handler: object
    names: dict[str, str]  # local parameter name -> full name
    calls: int = 0
    scored: tuple[str, ...] = ()  # full names its handler scored


def _all_parameter_terms(model, inputs, params, G, layer_method):
    full_name = {id(p): n for n, p in params.items()}
    layers: dict[nn.Module, _Layer] = {}
    for module in model.modules():
        handler = handler_for(module)
        own = {n: full_name[id(p)] for n, p in module.named_parameters(recurse=False) if id(p) in full_name}
        if handler is not None and own:
            layers[module] = _Layer(module, handler, own)
    B = inputs.shape[0]
    dtype = torch.promote_types(next(iter(params.values())).dtype, torch.float32)
    sq = torch.zeros(B, dtype=dtype, device=inputs.device)
    dot = None if G is None else torch.zeros_like(sq)
    edges, uses = [], {}

    def after(module, args, output):
        layer = layers[module]
        layer.calls += 1
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        x = args[0]
        edges.append(get_gradient_edge(output))
        output.register_hook(lambda grad, layer=layer, x=x, version=x._version: reduce(layer, x, version, grad))

    def reduce(layer: _Layer, x, version, grad):
        nonlocal sq, dot
        names = {local for local, full in layer.names.items() if uses.get(id(params[full])) == 1}
        if layer.calls != 1 or not names:
            return  # these parameters take the generic path
        if x._version != version:
            raise UnsupportedModelError(
                f"the input of {_describe(model, layer.module)} was modified in place after the layer ran; "
                "its per-sample gradient cannot be recovered. Use an out-of-place op (e.g. inplace=False)."
            )
        local_G = None if G is None else {n: G[layer.names[n]].to(grad.device) for n in names}
        try:
            s, t = layer.handler(layer.module, x, grad, names, local_G, layer_method)
        except LAYER_ERRORS as err:
            raise UnsupportedModelError(f"{_describe(model, layer.module)}: {err}") from err
        layer.scored = tuple(layer.names[n] for n in names)
        sq = sq + s.to(dtype)
        if dot is not None:
            dot = dot + t.to(dtype)

    handles = [m.register_forward_hook(after) for m in layers]
    try:
        with torch.enable_grad():
            logits = model(inputs)
            _check_logits(logits, B)
            labels = logits.detach().argmax(dim=1)
            loss = F.cross_entropy(logits.to(dtype), labels, reduction="sum")
            uses.update(_parameter_uses(loss))
            if edges:
                torch.autograd.grad(loss, edges, allow_unused=True)
    finally:
        for h in handles:
            h.remove()

    fast = {full for layer in layers.values() for full in layer.scored}
    rest = [n for n, p in params.items() if id(p) in uses and n not in fast]
    if rest:
        s, t = _generic_terms(model, inputs, {n: params[n] for n in rest}, G)
        sq = sq + s.to(dtype)
        if dot is not None:
            dot = dot + t.to(dtype)
    return sq, dot, rest


def _generic_terms(model, inputs, params, G):
    """Exact per-sample terms for ``params`` via ``torch.func`` on the whole model (slower)."""
    try:
        return per_sample_norm_and_dot(model, inputs, params, G)
    except Exception as err:  # vmap cannot run some ops; never fall back to a wrong number
        raise UnsupportedModelError(
            f"parameters {sorted(params)[:5]}{' ...' if len(params) > 5 else ''} are not covered by a fast layer "
            f"handler and torch.func could not compute their per-sample gradients ({type(err).__name__}: {err}). "
            "Supported fast layers: Linear, Conv1d/2d, BatchNorm1d/2d, LayerNorm, GroupNorm, Embedding; "
            "or use scope='last'."
        ) from err


def _parameter_uses(loss: torch.Tensor) -> dict[int, int]:
    """``id(leaf) -> how many ops of the loss's autograd graph use it``, for every leaf (parameter) that the loss
    depends on. An op whose only input needing a gradient is a leaf, or such an op's result (a cast, a transpose,
    a first layer) is counted as that leaf, so ``1`` means one op alone gives the leaf its whole gradient."""
    root = loss.grad_fn
    inputs, order, stack = {}, [], [(root, False)]
    while stack:  # depth-first, inputs before the ops that use them
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
        elif node not in inputs:
            inputs[node] = [n for n, _ in node.next_functions if n is not None]
            stack.append((node, True))
            stack.extend((n, False) for n in inputs[node] if n not in inputs)
    leaf_of = {}  # node -> id of the one leaf it is a function of, or None
    for node in order:
        ins = inputs[node]
        leaf_of[node] = id(node.variable) if hasattr(node, "variable") else leaf_of[ins[0]] if len(ins) == 1 else None
    uses: dict[int, int] = {}
    for node in order:
        if leaf_of[node] is None:
            for n in inputs[node]:
                if leaf_of[n] is not None:
                    uses[leaf_of[n]] = uses.get(leaf_of[n], 0) + 1
    if root is not None and leaf_of[root] is not None:
        uses[leaf_of[root]] = uses.get(leaf_of[root], 0) + 1
    return uses


def _check_logits(logits, batch_size: int) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != batch_size:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UnsupportedModelError(f"the model must return logits of shape [B, K] = [{batch_size}, K], got {shape}")


def _describe(model: nn.Module, module: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is module), "?")
    return f"module '{name}' ({type(module).__name__})"
