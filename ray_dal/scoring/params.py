"""Which parameters a score covers (its *scope*), and checks on a caller's gradient sum G."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

SCOPES = ("all", "last")


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` in registration order (the classifier ``scope="last"`` uses)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError(
            f"scope='last' needs a final nn.Linear classifier, but {type(model).__name__} has no nn.Linear; "
            "use scope='all'"
        )
    return found[-1]


def scoped_parameters(model: nn.Module, scope: str, last: tuple[str, nn.Linear] | None = None
                      ) -> dict[str, nn.Parameter]:
    """Trainable parameters in ``scope``, keyed like ``model.named_parameters()``.

    ``last``: ``final_linear(model)`` when the caller has it already (scope "last").
    """
    if scope == "all":
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    elif scope == "last":
        prefix, layer = last or final_linear(model)
        params = {f"{prefix}.{n}": p for n, p in layer.named_parameters() if p.requires_grad}
    else:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not params:
        raise ValueError(f"the model has no trainable parameters in scope={scope!r}")
    return params


def check_grad_sum(params: Mapping[str, torch.Tensor], grad_sum: Mapping[str, torch.Tensor] | None) -> None:
    """Raise a clear error unless ``grad_sum`` has exactly the keys and shapes of ``params``."""
    if grad_sum is None:
        raise ValueError("grad_sum is required unless gamma == 0; compute it with ray_dal.scoring.labeled_gradient")
    missing = [n for n in params if n not in grad_sum]
    if missing:
        raise ValueError(
            f"grad_sum lacks {len(missing)} parameter(s) of the scored scope, e.g. {missing[:3]}; "
            "compute it with labeled_gradient(model, ..., scope=<the same scope>)"
        )
    for n, p in params.items():
        if tuple(grad_sum[n].shape) != tuple(p.shape):
            raise ValueError(
                f"grad_sum[{n!r}] has shape {tuple(grad_sum[n].shape)} but the parameter has {tuple(p.shape)}"
            )
