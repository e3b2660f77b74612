"""G over a labeled subset of a pool, computed in parallel by Ray Data actors (for `ray-dal select`).

Each actor sums ``ray_dal.scoring.labeled_gradient`` over its batches and emits one flat partial
sum per batch; the driver adds them up. Labels come from the caller (a human's labels), not from
the pool, which may have none. The AL loop computes G inside its Ray Train workers instead.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import ray
import torch

from .. import console
from .actors import actor_device, load_model, use_cpu_share
from ..config import ModelConfig
from ..data import DEFAULT_TRANSFORM, ImageTransform, PoolInfo, preprocess_batch, read_pool
from ..errors import carry
from .scorer_pool import Actors, on_actors, one_actor_per_pass
from ..scoring import labeled_gradient, scoped_parameters


class _PartialGradSum:
    def __init__(self, model_cfg: ModelConfig, state_ref: Any, ids: np.ndarray, labels: np.ndarray, scope: str,
                 transform):
        use_cpu_share()
        self.device = actor_device()
        self.model = load_model(model_cfg, state_ref, self.device)
        self.ids, self.labels, self.scope, self.transform = ids, labels, scope, transform

    @carry
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = preprocess_batch(dict(batch), transform=self.transform, on_bad="fail")
        y = torch.from_numpy(self.labels[np.searchsorted(self.ids, pre["id"])])
        g = labeled_gradient(self.model, (torch.from_numpy(pre["x"]).to(self.device), y.to(self.device)), self.scope)
        flat = torch.cat([t.reshape(-1) for t in g.values()]).to("cpu", torch.float64).numpy()
        return {"n": np.array([len(y)]), "g": flat[None]}


def pool_grad_sum(
    pool: PoolInfo,
    ids: np.ndarray,
    labels: np.ndarray,
    *,
    model_cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    scope: str = "all",
    actors: Actors | None = None,
    batch_size: int = 512,
    transform: ImageTransform = DEFAULT_TRANSFORM,
) -> dict[str, torch.Tensor]:
    """G = sum over the pool rows ``ids`` (with ``labels``) of grad CE, keyed like named_parameters (float32), on
    ``actors`` (default: one 0.5-CPU actor for this pass, with a GPU when the cluster has them)."""
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    order = np.argsort(ids)
    ids, labels = ids[order], labels[order]
    shapes = {n: p.shape for n, p in scoped_parameters(load_model(model_cfg, state_dict), scope).items()}
    rows = read_pool(pool, columns=("id", "image"), ids=ids, preserve_order=False)
    outputs = on_actors(rows, _PartialGradSum, actors or one_actor_per_pass(), batch_size,
                        "a ray_dal.pipeline.grad_sum actor (G over the labeled samples)", model_cfg=model_cfg,
                        state_ref=ray.put(dict(state_dict)), ids=ids, labels=labels, scope=scope, transform=transform)
    total, count = np.zeros(sum(int(np.prod(s)) for s in shapes.values())), 0
    with console.progress(len(ids), "G", "img") as bar:
        for out in outputs:
            total += out["g"].sum(0)
            count += int(out["n"].sum())
            bar.update(int(out["n"].sum()))
    if count != len(ids):
        raise RuntimeError(f"G summed {count} labeled samples, expected {len(ids)}")
    grads, start = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        grads[name] = torch.from_numpy(total[start : start + size].reshape(shape)).float()
        start += size
    return grads
