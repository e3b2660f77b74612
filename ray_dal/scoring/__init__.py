"""Per-sample acquisition scores: dynamic AL's training-dynamics score and the uncertainty baselines.

Pure PyTorch: nothing here knows about Ray.

- `labeled_gradient(model, batches, scope)`: G, the summed labeled gradient.
- `dynamic_scores(model, inputs, grad_sum, gamma, scope)`: s(x) = ||g_x||^2 + gamma <g_x, G>.
- `least_confidence`, `margin`, `entropy` (of logits) and `random_scores` (of ids and a seed).
"""

from .approximation import ApproximationRatio, approximation_ratio
from .engine import UnsupportedModelError, dynamic_scores, generic_path_parameters
from .labeled import labeled_gradient
from .params import SCOPES, final_linear, scoped_parameters
from .uncertainty import entropy, least_confidence, margin, random_scores

__all__ = [
    "ApproximationRatio",
    "SCOPES",
    "UnsupportedModelError",
    "approximation_ratio",
    "dynamic_scores",
    "entropy",
    "final_linear",
    "generic_path_parameters",
    "labeled_gradient",
    "least_confidence",
    "margin",
    "random_scores",
    "scoped_parameters",
]
