"""PROVISIONAL: exact but slow; the hook-based engine replaces this module's body."""
from __future__ import annotations
from .reference import vmap_scores


class UnsupportedModelError(ValueError):
    """The model holds a trainable parameter the engine cannot score exactly."""


def dynamic_scores(model, inputs, grad_sum, gamma=2.0, scope="all"):
    return vmap_scores(model, inputs, grad_sum, gamma=gamma, scope=scope)
