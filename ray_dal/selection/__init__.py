"""Batch selection for the diversity baselines: pure PyTorch/NumPy, nothing here knows about Ray.

- `embedding_parts(model, x)`: the penultimate features ``a`` and ``e = softmax - onehot(argmax)`` whose
  outer product is BADGE's last-layer gradient embedding (never materialised).
- `k_center_greedy`: Coreset's greedy k-center on embeddings, labeled points as initial centres.
- `kmeans_pp_seeding`: BADGE's k-means++ seeding on factorised gradient embeddings.
- `albl`: the bandit of Active Learning by Learning over (confidence, coreset).
"""

from .embeddings import embedding_parts
from .kcenter import k_center_greedy
from .kmeanspp import kmeans_pp_seeding

__all__ = ["embedding_parts", "k_center_greedy", "kmeans_pp_seeding"]
