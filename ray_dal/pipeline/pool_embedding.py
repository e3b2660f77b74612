"""Ray plumbing for the diversity baselines: stream chosen pool samples through embedding actors.

Pool rows (only the requested ids are read) -> `PoolEmbedder` on the scorer actors (decode, one forward each) ->
driver, which gathers ``(id, pred, prob, a[, e])`` for every sample: O(N (d + K)) floats, which is why the
strategies that need whole-pool embeddings work on a candidate subsample (``scoring.candidates``).
The math is `ray_dal.selection.embedding_parts`; the actors are the scorers' (`ray_dal.pipeline.scorer_pool`:
``scoring.num_scorers``, ``cpus_per_scorer``, ``gpus_per_scorer``, ``scorer_lifetime``, ``batch_size``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import ray
import torch

from .. import console
from .actors import (
    actor_device,
    check_weights,
    load_model,
    model_config,
    scorer_actors,
    use_cpu_share,
)
from ..config import ConfigError, ModelConfig, ScoringConfig
from ..data import DEFAULT_TRANSFORM, ImageTransform, PoolInfo, inspect_pool, read_pool
from ..errors import carry
from .decode import decode_ahead, decoded
from .scorer_pool import on_actors
from .held_out import (HELD_OUT, HeldOutRows, Tally, Tested, output_rows, sorted_ids, split_batch, test_batch,
                       with_held_out)
from ..scoring import final_linear
from ..selection import embedding_parts


@dataclass
class PoolEmbedding:
    """Embeddings of pool samples, sorted by id.

    ``ids`` [N] int64; ``pred`` [N] int64 (argmax class); ``prob`` [N] float32 (its softmax probability);
    ``features`` [N, d] float32 (the last linear layer's input, ``a``); ``residuals`` [N, K] float32
    (softmax - onehot(pred), ``e``) or None when not asked for; ``skipped_ids``: images that could not be
    decoded under ``on_bad="skip"``; ``tested``: held-out rows tested in the same pass, else None.
    """

    ids: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    features: np.ndarray
    residuals: np.ndarray | None
    skipped_ids: np.ndarray
    seconds: float
    tested: Tested | None = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Positions of ``ids`` (each must be present) in this embedding."""
        pos = np.searchsorted(self.ids, ids)
        if np.any(pos >= self.ids.size) or np.any(self.ids[np.minimum(pos, self.ids.size - 1)] != ids):
            raise KeyError(f"ids {np.setdiff1d(ids, self.ids)[:10].tolist()} were not embedded")
        return pos


class PoolEmbedder:
    """Callable class for ``map_batches``: one model per actor; a batch of (id, image) in, embeddings out.

    Held-out rows (`ray_dal.pipeline.held_out`) are tested, not embedded: their counts ride on a last row
    (``held_out`` True, ``skipped`` False, id -1) in ``correct`` / ``tested``, their undecodable images on rows
    with ``held_out`` and ``skipped`` True."""

    def __init__(self, model_cfg: ModelConfig | Mapping[str, Any], state_ref: Any, residuals: bool,
                 transform: ImageTransform = DEFAULT_TRANSFORM, on_bad: str = "fail"):
        self.device = actor_device()
        use_cpu_share()
        self.model = load_model(model_cfg, state_ref, self.device)
        layer = final_linear(self.model)[1]
        self.widths = {"a": layer.in_features, "e": layer.out_features}
        self.residuals, self.transform, self.on_bad = residuals, transform, on_bad

    @carry
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool, held_out = split_batch(batch)
        pre = decoded(pool, self.transform, self.on_bad)
        kept = np.asarray(pre["id"], np.int64)
        skipped = np.setdiff1d(pool["id"], kept)
        correct, tested, skipped_held_out = 0, 0, np.empty(0, np.int64)
        if held_out is not None:
            correct, tested, skipped_held_out = test_batch(self.model, held_out, self.transform, self.on_bad,
                                                           self.device)
        out = output_rows(kept, skipped, skipped_held_out, {"correct": correct, "tested": tested})
        n = out["id"].size
        out["pred"], out["prob"] = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        for name in ("a", "e") if self.residuals else ("a",):
            out[name] = np.zeros((n, self.widths[name]), np.float32)  # other rows stay 0
        if kept.size:
            a, e = embedding_parts(self.model, torch.from_numpy(pre["x"]).to(self.device))
            low = e.min(dim=1)  # e = p - onehot(argmax): most negative there, at p - 1
            out["pred"][: kept.size] = low.indices.cpu().numpy()
            out["prob"][: kept.size] = (low.values + 1).cpu().numpy()
            out["a"][: kept.size] = a.cpu().numpy()
            if self.residuals:
                out["e"][: kept.size] = e.cpu().numpy()
        return out


def embed_pool(
    pool: Any,
    ids: np.ndarray,
    *,
    model_cfg: ModelConfig | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    scoring_cfg: ScoringConfig,
    residuals: bool = False,
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
    held_out: HeldOutRows | None = None,
) -> PoolEmbedding:
    """Embed the pool samples ``ids`` (unique; each must be in the pool) on the scorer actors; test the model on
    ``held_out`` rows in the same pass (``PoolEmbedding.tested``)."""
    model_cfg = model_config(model_cfg)
    info = pool if isinstance(pool, PoolInfo) else inspect_pool(pool)
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or ids.size == 0 or np.unique(ids).size != ids.size:
        raise ValueError(f"ids must be a non-empty 1-D array of unique sample ids; got shape {ids.shape}")
    start = time.perf_counter()
    state_ref = ray.put({n: t.detach().cpu() for n, t in check_weights(model_cfg, state_dict, "state_dict").items()})
    parts = with_held_out(read_pool(info, columns=("id", "image"), ids=ids, preserve_order=False), held_out)
    outputs = on_actors([decode_ahead(rows, scoring_cfg, transform, on_bad) for rows in parts], PoolEmbedder,
                        scorer_actors(scoring_cfg), scoring_cfg.batch_size,
                        "a ray_dal.pipeline.pool_embedding.PoolEmbedder actor", model_cfg=model_cfg,
                        state_ref=state_ref, residuals=residuals, transform=transform, on_bad=on_bad)
    parts: dict[str, list[np.ndarray]] = {"id": [], "pred": [], "prob": [], "a": [], "e": [], "skipped": []}
    tally = Tally()
    with console.progress(ids.size + (held_out.count if held_out else 0),
                          "embed" if held_out is None else "test+embed", "img") as bar:
        for out in outputs:
            mine = ~out[HELD_OUT]
            bad, good = out["skipped"] & mine, ~out["skipped"] & mine
            parts["skipped"].append(out["id"][bad])
            for name in ("id", "pred", "prob", "a", "e") if residuals else ("id", "pred", "prob", "a"):
                parts[name].append(out[name][good])
            bar.update(int(mine.sum()) + tally.add(out))
    got = np.concatenate(parts["id"])
    order = np.argsort(got)
    skipped = sorted_ids(parts["skipped"])
    if got.size + skipped.size != ids.size:
        raise RuntimeError(f"embedded {got.size} and skipped {skipped.size} of {ids.size} samples")
    if got.size == 0:
        raise ConfigError(f"none of the {ids.size} images to embed could be decoded; see data.on_bad_image")
    return PoolEmbedding(
        ids=got[order], pred=np.concatenate(parts["pred"])[order], prob=np.concatenate(parts["prob"])[order],
        features=np.concatenate(parts["a"])[order],
        residuals=np.concatenate(parts["e"])[order] if residuals else None,
        skipped_ids=skipped, seconds=time.perf_counter() - start, tested=None if held_out is None else tally.result(),
    )
