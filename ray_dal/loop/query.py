"""One round's query, whatever the strategy.

- top-b strategies (dynamic, random, entropy, margin, confidence): `ray_dal.pipeline.pool_scoring.score_pool`.
- ``coreset``: greedy k-center on the penultimate features of a candidate subsample of the unlabeled
  pool, the labeled set as initial centres (`ray_dal.selection.k_center_greedy`).
- ``badge``: k-means++ seeding on the candidates' last-layer gradient embeddings, factorised
  (`ray_dal.selection.kmeans_pp_seeding`).
- ``albl``: a bandit over (confidence, coreset) (`ray_dal.selection.albl`); its state travels in the
  rounds' metrics (``history``), so a resumed run continues the same bandit.

Memory of the diversity strategies, on the driver: candidates x (d + 1) float32 for coreset plus the
labeled set's, candidates x (d + K + 1) for badge (d: the last linear layer's input width, K: classes);
e.g. 100,000 candidates of ResNet18 (d = 512) on CIFAR-10 are ~210 MB for badge. ``scoring.candidates``
caps N (a seeded subsample, fresh each round).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import TOP_B_STRATEGIES, ConfigError, ModelConfig, ScoringConfig
from ..data import DEFAULT_TRANSFORM, ImageTransform, PoolInfo, read_ids
from ..pipeline.pool_embedding import PoolEmbedding, embed_pool
from ..pipeline.held_out import HeldOutRows
from ..pipeline.pool_scoring import PoolQuery, score_pool
from ..selection import albl, k_center_greedy, kmeans_pp_seeding

log = logging.getLogger("ray_dal")


@dataclass
class Labeled:
    """The labeled set S at query time, and (ALBL) the earlier rounds' queries and bandit states."""

    ids: np.ndarray  # sorted
    labels: np.ndarray
    history: Sequence[Mapping[str, Any]] = ()  # per earlier round: {"selected_ids": ..., "albl": {...}}


def select_query(
    pool: PoolInfo,
    labeled: Labeled,
    *,
    model_cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    grad_sum: Mapping[str, torch.Tensor] | None,
    scoring_cfg: ScoringConfig,
    budget: int,
    exclude_ids: np.ndarray,
    seed: int,
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
    held_out: HeldOutRows | None = None,
) -> PoolQuery:
    """The query of ``scoring_cfg.strategy``: ``budget`` pool ids, none in ``exclude_ids`` (which holds S).

    ``held_out``: rows to test the model on in the query's first pass over the pool (``PoolQuery.tested``)."""
    strategy = scoring_cfg.strategy
    common = dict(model_cfg=model_cfg, state_dict=state_dict, scoring_cfg=scoring_cfg, budget=budget,
                  exclude_ids=exclude_ids, seed=seed, transform=transform, on_bad=on_bad, held_out=held_out)
    if strategy in TOP_B_STRATEGIES:
        return _top_b(pool, grad_sum=grad_sum, **common)
    if strategy == "coreset":
        return _coreset(pool, labeled, **common)
    if strategy == "badge":
        return _badge(pool, **common)
    if strategy == "albl":
        return _albl(pool, labeled, **common)
    raise ConfigError(f"scoring.strategy = {strategy!r} is unknown")


def _top_b(pool, *, grad_sum, model_cfg, state_dict, scoring_cfg, budget, exclude_ids, seed, transform,
           on_bad, held_out=None) -> PoolQuery:
    return score_pool(pool, model_cfg=model_cfg, state_dict=state_dict, grad_sum=grad_sum, scoring_cfg=scoring_cfg,
                      budget=budget, exclude_ids=exclude_ids, seed=seed, transform=transform, on_bad=on_bad,
                      held_out=held_out)


def candidate_ids(pool: PoolInfo, exclude_ids: np.ndarray, budget: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted unlabeled pool ids to choose from: all of them, or a seeded subsample of ``limit``."""
    unlabeled = np.setdiff1d(read_ids(pool), exclude_ids)
    if budget > unlabeled.size:
        raise ConfigError(f"budget b = {budget} exceeds the {unlabeled.size} unlabeled samples of {pool.source}")
    if limit is None or unlabeled.size <= limit:
        return unlabeled
    if limit < budget:
        raise ConfigError(f"scoring.candidates = {limit} is smaller than the budget b = {budget}; raise it")
    return np.sort(np.random.default_rng([seed, 1]).choice(unlabeled, limit, replace=False))


def _embed(pool, ids, *, residuals, model_cfg, state_dict, scoring_cfg, transform, on_bad,
           held_out=None) -> PoolEmbedding:
    emb = embed_pool(pool, ids, model_cfg=model_cfg, state_dict=state_dict, scoring_cfg=scoring_cfg,
                     residuals=residuals, transform=transform, on_bad=on_bad, held_out=held_out)
    width = emb.features.shape[1] + (emb.residuals.shape[1] if residuals else 0)
    log.info("embedded %d samples (%d floats each, %.0f MB on the driver) in %.1fs", emb.ids.size, width,
             emb.ids.size * width * 4 / 2**20, emb.seconds)
    return emb


def _picked(cand: PoolEmbedding, picks: torch.Tensor, gaps: torch.Tensor, emb: PoolEmbedding, info: dict) -> PoolQuery:
    """The query of the rows ``picks`` of ``cand`` (a subset of the pass's embedding ``emb``)."""
    rows = picks.numpy()
    return PoolQuery(cand.ids[rows], gaps.double().numpy(), emb.ids.size, emb.seconds, emb.skipped_ids,
                     cand.pred[rows], cand.prob[rows].astype(np.float64), info, emb.tested)


def _coreset(pool, labeled: Labeled, *, model_cfg, state_dict, scoring_cfg, budget, exclude_ids, seed, transform,
             on_bad, held_out=None, labeled_embedding: PoolEmbedding | None = None) -> PoolQuery:
    cand_ids = candidate_ids(pool, exclude_ids, budget, scoring_cfg.candidates, seed)
    emb = _embed(pool, cand_ids if labeled_embedding is not None else np.union1d(cand_ids, labeled.ids),
                 residuals=False, model_cfg=model_cfg, state_dict=state_dict, scoring_cfg=scoring_cfg,
                 transform=transform, on_bad=on_bad, held_out=held_out)
    centres = labeled_embedding if labeled_embedding is not None else _subset(emb, labeled.ids)
    cand = _subset(emb, cand_ids)
    _enough(cand, budget)
    picks, gaps = k_center_greedy(torch.from_numpy(cand.features), torch.from_numpy(centres.features), budget)
    return _picked(cand, picks, gaps, emb, {"candidates": int(cand.ids.size), "centres": int(centres.ids.size)})


def _badge(pool, *, model_cfg, state_dict, scoring_cfg, budget, exclude_ids, seed, transform, on_bad,
           held_out=None) -> PoolQuery:
    cand_ids = candidate_ids(pool, exclude_ids, budget, scoring_cfg.candidates, seed)
    emb = _embed(pool, cand_ids, residuals=True, model_cfg=model_cfg, state_dict=state_dict,
                 scoring_cfg=scoring_cfg, transform=transform, on_bad=on_bad, held_out=held_out)
    _enough(emb, budget)
    picks, gaps = kmeans_pp_seeding(torch.from_numpy(emb.features), torch.from_numpy(emb.residuals), budget,
                                    np.random.default_rng([seed, 2]))
    return _picked(emb, picks, gaps, emb, {"candidates": int(emb.ids.size)})


def _subset(emb: PoolEmbedding, ids: np.ndarray) -> PoolEmbedding:
    """The rows of ``emb`` whose ids are in ``ids`` (skipped images are simply absent)."""
    rows = np.flatnonzero(np.isin(emb.ids, ids))
    return PoolEmbedding(emb.ids[rows], emb.pred[rows], emb.prob[rows], emb.features[rows],
                         None if emb.residuals is None else emb.residuals[rows], emb.skipped_ids, emb.seconds)


def _enough(cand: PoolEmbedding, budget: int) -> None:
    if cand.ids.size < budget:
        raise ConfigError(f"budget b = {budget} exceeds the {cand.ids.size} candidates that could be embedded "
                          f"({cand.skipped_ids.size} bad image(s) skipped); lower b or raise scoring.candidates")


def _albl(pool, labeled: Labeled, *, model_cfg, state_dict, scoring_cfg, budget, exclude_ids, seed, transform,
          on_bad, held_out=None) -> PoolQuery:
    common = dict(model_cfg=model_cfg, state_dict=state_dict, scoring_cfg=scoring_cfg, transform=transform,
                  on_bad=on_bad)
    weights, reward, embedded, tested = np.ones(len(albl.ARMS)), None, None, None
    if labeled.history:  # reward the arm drawn last round with the new model's weighted training accuracy
        embedded = _embed(pool, labeled.ids, residuals=False, held_out=held_out, **common)
        tested, held_out = embedded.tested, None  # tested in this first pass
        last = labeled.history[-1]["albl"]
        importance = _importance(labeled, embedded.ids)
        truth = labeled.labels[np.searchsorted(labeled.ids, embedded.ids)]
        reward = albl.importance_weighted_accuracy(embedded.pred == truth, importance)
        arm_before = albl.ARMS.index(last["arm"])
        weights = albl.update(last["weights"], arm_before, reward, last["probabilities"][arm_before])
    probabilities = albl.probabilities(weights)
    arm = albl.draw_arm(weights, np.random.default_rng([seed, 3]))
    info = {"albl": {"arm": albl.ARMS[arm], "weights": weights.tolist(), "probabilities": probabilities.tolist(),
                     "reward": reward}}
    log.info("ALBL draws %s (p = %s, reward %s)", albl.ARMS[arm], np.round(probabilities, 3).tolist(), reward)
    if albl.ARMS[arm] == "confidence":
        q = _top_b(pool, grad_sum=None, budget=budget, exclude_ids=exclude_ids, seed=seed, held_out=held_out,
                   **{**common, "scoring_cfg": _with_strategy(scoring_cfg, "confidence")})
    else:
        q = _coreset(pool, labeled, budget=budget, exclude_ids=exclude_ids, seed=seed, labeled_embedding=embedded,
                     held_out=held_out, **common)
    q.info.update(info)
    if embedded is not None:
        q.tested = tested
    return q


def _with_strategy(cfg: ScoringConfig, strategy: str) -> ScoringConfig:
    return dataclasses.replace(cfg, strategy=strategy)


def _importance(labeled: Labeled, ids: np.ndarray) -> np.ndarray:
    """ALBL's importance of each labeled id: 1 for the initial set, else the draw probability of the arm
    that queried it."""
    importance = np.ones(ids.size)
    for past in labeled.history:
        state = past["albl"]
        p = state["probabilities"][albl.ARMS.index(state["arm"])]
        importance[np.isin(ids, past["selected_ids"])] = p
    return importance
