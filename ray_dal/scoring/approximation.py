"""The subset approximation ratio (the paper's Eq. 13-14 and Figure 4).

Dynamic AL ranks samples by their own score instead of scoring whole queries. For a query Q (pseudo
labels ``ŷ_x = argmax f(x)``) and the labeled set S (true labels)::

    G_Q = Σ_{x∈Q} ∇θ CE(f(x), ŷ_x)        G_S = Σ_{(x,y)∈S} ∇θ CE(f(x), y)
    Δ(Q|S) = ||G_S + G_Q||² - ||G_S||² = ||G_Q||² + 2<G_Q, G_S>          (the change of training dynamics)
    R(Q|S) = Σ_{x∈Q} (||g_x||² + 2<g_x, G_S>) / Δ(Q|S)                  (the sum of the dynamic scores, γ = 2)

Because Σ_x <g_x, G_S> = <G_Q, G_S>, ``R - 1 = (Σ_x ||g_x||² - ||G_Q||²) / Δ = -Σ_{x≠x'} <g_x, g_x'> / Δ``:
R = 1 exactly when those cross terms cancel (e.g. mutually orthogonal gradients), so always for b = 1.
Everything is computed as the scorer does: eval mode, ``reduction="sum"``, the same scope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from .engine import dynamic_scores
from .labeled import labeled_gradient
from .modes import eval_mode
from .params import check_grad_sum


@dataclass(frozen=True)
class ApproximationRatio:
    """R(Q|S) = numerator / delta for a query of ``b`` samples (Python floats, accumulated in float64)."""

    ratio: float
    numerator: float  # Σ_{x∈Q} dynamic score (γ = 2)
    delta: float  # Δ(Q|S) = ||G_Q||² + 2<G_Q, G_S>
    b: int

    @classmethod
    def of(cls, numerator: float, delta: float, b: int) -> ApproximationRatio:
        """The ratio of ``numerator`` and ``delta``; ValueError for an empty query or Δ = 0."""
        _require_query(b)
        if delta == 0:
            raise ValueError(
                f"Δ(Q|S) = ||G_Q||² + 2<G_Q, G_S> is exactly 0 for this query of {b} samples "
                "(e.g. every pseudo-label gradient is zero), so R(Q|S) is undefined"
            )
        return cls(ratio=float(numerator) / float(delta), numerator=float(numerator), delta=float(delta), b=b)


def _require_query(b: int) -> None:
    if b < 1:
        raise ValueError(f"the approximation ratio needs a non-empty query Q, got b = {b} samples")


def change_of_dynamics(grad_q: Mapping[str, torch.Tensor], grad_s: Mapping[str, torch.Tensor]) -> float:
    """Δ(Q|S) = ||G_Q||² + 2<G_Q, G_S> in float64. ``grad_s`` must hold every key of ``grad_q``, same shapes."""
    check_grad_sum(grad_q, grad_s)
    total = torch.zeros((), dtype=torch.float64)
    for name, q in grad_q.items():
        q = q.detach().to(torch.float64).flatten()
        s = grad_s[name].detach().to(q).flatten()
        total += (q @ q + 2 * (q @ s)).cpu()
    return float(total)


def query_gradient(model: nn.Module, inputs: torch.Tensor, scope: str = "all", batch_size: int = 256
                   ) -> dict[str, torch.Tensor]:
    """G_Q: `labeled_gradient` of ``inputs`` ``[b, ...]`` with their argmax pseudo labels (eval mode), in
    chunks of ``batch_size``. Keyed like ``model.named_parameters()`` (the scope's), float32 or wider."""
    return labeled_gradient(model, _pseudo_labeled(model, inputs, batch_size), scope=scope)


def _pseudo_labeled(model: nn.Module, inputs: torch.Tensor, batch_size: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for chunk in inputs.split(batch_size):
        with eval_mode(model), torch.no_grad():
            labels = model(chunk).argmax(dim=1)
        yield chunk, labels


def approximation_ratio(
    model: nn.Module,
    inputs_q: torch.Tensor,
    grad_sum_s: Mapping[str, torch.Tensor],
    scope: str = "all",
    batch_size: int = 256,
) -> ApproximationRatio:
    """R(Q|S) for the query ``inputs_q`` ``[b, ...]`` given G_S (`labeled_gradient` with the same ``scope``).

    The numerator sums `dynamic_scores` (γ = 2) and G_Q is `query_gradient`, both in chunks of
    ``batch_size`` (the result does not depend on it beyond rounding); sums and Δ are taken in float64.
    Costs about one scoring pass plus one forward and one training-style backward over Q. The model's
    modes and ``.grad`` are left as they were. ValueError for an empty Q or Δ = 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b = int(inputs_q.shape[0])
    _require_query(b)
    numerator = sum(
        float(dynamic_scores(model, chunk, grad_sum_s, gamma=2.0, scope=scope).to(torch.float64).sum())
        for chunk in inputs_q.split(batch_size)
    )
    delta = change_of_dynamics(query_gradient(model, inputs_q, scope, batch_size), grad_sum_s)
    return ApproximationRatio.of(numerator, delta, b)
