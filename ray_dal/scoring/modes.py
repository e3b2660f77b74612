"""Context managers that leave a caller's model exactly as they found it."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag afterwards."""
    training = [m for m in model.modules() if m.training]  # a model already in eval mode: nothing to set
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True
