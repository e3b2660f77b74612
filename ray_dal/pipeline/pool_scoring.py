"""Score an unlabeled pool on the scorer actors and return its top-b (ids, scores).

Pool -> read tasks (one per row group; by id when most rows are excluded) -> `PoolScorer` on the scorer actors
(`ray_dal.pipeline.scorer_pool`: decode, drop excluded ids, score, keep the batch's own top-b) -> driver (`TopB`
merge). Held-out labeled rows (a round's test set) may ride in the same pass (`ray_dal.pipeline.held_out`): the
same actors count the model's correct predictions on them. Only ids, scores and the model's prediction of the
kept samples reach the driver: memory there is O(b) plus one block of per-batch top-b's, never O(pool). The math
lives in `ray_dal.scoring`, the decoding in `ray_dal.data`, the selection in `ray_dal.topk`; this module only
moves things between them.

Faults. The scorer actors, whichever their lifetime (`ray_dal.pipeline.scorer_pool`), are restarted when they
die (killed, OOM, their node lost) and their unfinished batches retried. A batch's scores depend only on
the model and the batch, so the query is the one a fault-free run returns (tests/test_reliability.py). A
fault that never clears (a batch that kills every actor) fails after ``runtime.no_progress_timeout_s``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import ray
import torch

from ray_dal import console
from ray_dal.pipeline.actors import (
    actor_device,
    check_weights,
    load_model,
    model_config,
    resolve,
    scorer_actors,
    use_cpu_share,
)
from ray_dal.config import TOP_B_STRATEGIES, ConfigError, ModelConfig, ScoringConfig
from ray_dal.data import (
    DEFAULT_TRANSFORM,
    ImageTransform,
    PoolInfo,
    inspect_pool,
    read_ids,
    read_pool,
)
from ray_dal.data.transforms import ON_BAD
from ray_dal.errors import carry
from ray_dal.pipeline.decode import decode_ahead, decoded
from ray_dal.pipeline.scorer_pool import on_actors
from ray_dal.pipeline.held_out import (HELD_OUT, HeldOutRows, Tally, Tested, output_rows, sorted_ids, split_batch,
                                      test_batch, with_held_out)
from ray_dal.scoring import (
    dynamic_scores,
    entropy,
    least_confidence,
    margin,
    random_scores,
)
from ray_dal.scoring.modes import eval_mode
from ray_dal.scoring.params import check_grad_sum, scoped_parameters
from ray_dal.topk import TopB, top_b_rows

_UNCERTAINTY = {"entropy": entropy, "margin": margin, "confidence": least_confidence}
READ_ALL_ABOVE = 0.9  # read every row of the pool when at least this share of it is to be scored


@dataclass
class PoolQuery:
    """A query: ``ids`` int64 [b] in selection order (rank 0 first), ``scores`` float64 [b] what chose them.

    `score_pool` sorts by (score desc, id asc); the diversity strategies (`ray_dal.loop.query`) give the
    squared distance to the nearest centre when picked. ``pred`` int64 [b] and ``prob`` float64 [b]: the
    model's predicted class of each and its softmax probability (-1 and NaN when no model was given: the
    random strategy without weights). ``num_scored`` counts the unlabeled samples scored or embedded
    (pool minus excluded ids minus skipped bad images); ``skipped_ids`` lists images that failed to
    decode under ``on_bad="skip"``; ``seconds`` is the wall time of the whole pipeline (actor start-up
    included); ``info``: strategy-specific, JSON-able facts for the round's metrics (ALBL's bandit state,
    the candidate count).
    """

    ids: np.ndarray
    scores: np.ndarray
    num_scored: int
    seconds: float
    skipped_ids: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    tested: Tested | None = None  # held-out rows tested in the same pass (`HeldOutRows`), else None

    @property
    def samples_per_second(self) -> float:
        return self.num_scored / self.seconds if self.seconds > 0 else float("inf")


def _check_strategy(strategy: str) -> None:
    if strategy not in TOP_B_STRATEGIES:
        raise ValueError(f"score_pool ranks by a per-sample score: strategy {strategy!r} is not one of "
                         f"{list(TOP_B_STRATEGIES)} (coreset, badge and albl go through ray_dal.loop.query.select_query)")


def _as_ids(exclude_ids: Any) -> np.ndarray:
    ids = np.asarray(exclude_ids if exclude_ids is not None else [])
    if ids.size == 0:
        return np.empty(0, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"exclude_ids must be a 1-D integer array of sample ids, got {ids.dtype} {ids.shape}")
    return np.unique(ids.astype(np.int64))


class PoolScorer:
    """Callable class for ``map_batches``: one model per actor; each batch in, its top-``budget`` out.

    Input: ``id``, ``image`` and, when held-out rows ride along, ``label`` and ``held_out`` (`HELD_OUT`).
    Output per batch (numpy): ``id`` int64, ``score`` float64, ``pred`` int64 / ``prob`` float64 (the
    model's class and its probability; -1 / NaN without a model), ``skipped`` bool (True: an image that
    failed to decode under ``on_bad="skip"``, score 0, not a candidate), ``held_out`` bool (True: a held-out
    row's; with ``skipped`` False, the batch's counts row, id -1) and the counts ``num_scored`` (pool samples
    scored), ``correct`` and ``tested`` (held-out rows predicted right / decoded), non-zero only on the
    counts row that ends every batch (so each column's sum over all batches is the pass's total). Errors
    reach the driver as themselves
    (`ray_dal.errors.carry`): ``ray_dal.topk.NonFiniteScoreError`` naming the ids whose score is NaN or
    infinite, ``ray_dal.data.ImageDecodeError`` for bad images under ``on_bad="fail"``.
    """

    def __init__(
        self,
        model_cfg: ModelConfig | Mapping[str, Any],
        state_ref: Any,
        grad_ref: Any,
        strategy: str,
        gamma: float,
        scope: str,
        seed: int,
        budget: int,
        exclude_ids: np.ndarray,
        transform: ImageTransform = DEFAULT_TRANSFORM,
        on_bad: str = "fail",
    ):
        _check_strategy(strategy)
        self.strategy, self.gamma, self.scope, self.seed = strategy, float(gamma), scope, int(seed)
        self.budget, self.transform, self.on_bad = int(budget), transform, on_bad
        self.exclude_ids = exclude_ids  # sorted unique int64 (read-only when it came through Ray)
        self.device = actor_device()
        use_cpu_share()
        self.model = self.grad_sum = None
        if state_ref is None:
            return  # random scores need no model; without one there is no prediction either
        self.model = load_model(model_cfg, state_ref, self.device)
        if strategy == "dynamic":
            grad_sum = resolve(grad_ref)
            if grad_sum is not None:
                self.grad_sum = {n: g.to(self.device) for n, g in grad_sum.items()}

    def _scores(self, ids: np.ndarray, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor | None]:
        """(scores float64 [N], the model's logits [N, K] when scoring computed them, else None)."""
        if self.strategy == "random":
            return random_scores(ids, self.seed), None
        x = x.to(self.device)
        if self.strategy == "dynamic":
            with _first_output(self.model) as out:
                scores = dynamic_scores(self.model, x, self.grad_sum, gamma=self.gamma, scope=self.scope)
            logits = out[0]
        else:
            with torch.inference_mode():
                logits = self.model(x)
            scores = _UNCERTAINTY[self.strategy](logits)
        return scores.detach().to("cpu", torch.float64).numpy(), logits.detach()

    def _predictions(self, x: torch.Tensor, logits: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
        """(class int64 [N], its probability float64 [N]) of the rows of ``x`` (``logits`` when known)."""
        if self.model is None:
            return np.full(len(x), -1, np.int64), np.full(len(x), np.nan)
        if logits is None:
            with eval_mode(self.model), torch.inference_mode():
                logits = self.model(x.to(self.device))
        prob, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
        return pred.cpu().numpy().astype(np.int64), prob.cpu().double().numpy()

    @carry
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pool, held_out = split_batch(batch)
        keep = ~np.isin(pool["id"], self.exclude_ids)
        top_ids, top_scores, skipped = np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64)
        pred, prob = np.empty(0, np.int64), np.empty(0, np.float64)
        count = 0
        if keep.any():
            kept = {name: col[keep] for name, col in pool.items()}
            pre = decoded(kept, self.transform, self.on_bad)
            scored_ids = np.asarray(pre["id"], dtype=np.int64)
            skipped = np.setdiff1d(kept["id"], scored_ids)
            count = scored_ids.size
            if count:
                x = torch.from_numpy(pre["x"])
                scores, logits = self._scores(scored_ids, x)
                rows = top_b_rows(scored_ids, scores, self.budget)
                top_ids, top_scores = scored_ids[rows], scores[rows]
                pred, prob = self._predictions(x[rows], None if logits is None else logits[rows])
        correct, tested, skipped_held_out = 0, 0, np.empty(0, np.int64)
        if held_out is not None:
            correct, tested, skipped_held_out = test_batch(self.model, held_out, self.transform, self.on_bad,
                                                           self.device)
        out = output_rows(top_ids, skipped, skipped_held_out,
                          {"num_scored": count, "correct": correct, "tested": tested})
        rest = out["id"].size - top_ids.size  # rows after the top ones: no score, no prediction
        out["score"] = np.concatenate([top_scores, np.zeros(rest)])
        out["pred"] = np.concatenate([pred, np.full(rest, -1, np.int64)])
        out["prob"] = np.concatenate([prob, np.full(rest, np.nan)])
        return out


def score_pool(
    pool: Any,
    *,
    model_cfg: ModelConfig | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None,
    grad_sum: Mapping[str, torch.Tensor] | None,
    scoring_cfg: ScoringConfig,
    budget: int,
    exclude_ids: np.ndarray,
    seed: int,
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
    held_out: HeldOutRows | None = None,
) -> PoolQuery:
    """Score every pool sample not in ``exclude_ids`` and return the top ``budget`` (a `PoolQuery`); test the
    model on ``held_out`` rows in the same pass (``PoolQuery.tested``).

    ``pool`` is what `ray_dal.data.read_pool` takes. ``state_dict`` (of ``build_model(**model_cfg)``)
    and ``grad_sum`` (G, from `ray_dal.scoring.labeled_gradient` with the same scope; needed for
    ``strategy="dynamic"`` unless gamma == 0) are put in the object store once and fetched once per
    actor. Needs a running Ray (`ray_dal.pipeline.runtime.init_ray`). Errors inside the pipeline are re-raised
    as their root cause (e.g. ``ray_dal.topk.NonFiniteScoreError``, ``ray_dal.data.ImageDecodeError``,
    with their ids). ``seconds`` runs from shipping the weights to the merged result.
    """
    strategy = scoring_cfg.strategy
    _check_strategy(strategy)
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad = {on_bad!r} is invalid: choose one of {list(ON_BAD)}")
    model_cfg = model_config(model_cfg)
    exclude = _as_ids(exclude_ids)
    info = pool if isinstance(pool, PoolInfo) else inspect_pool(pool)
    pool_ids = read_ids(info)
    candidates = ~np.isin(pool_ids, exclude)
    unlabeled = int(candidates.sum())
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= unlabeled:
        raise ValueError(
            f"budget b = {budget!r} is invalid: pool {info.source} has {info.num_rows} samples, "
            f"{info.num_rows - unlabeled} of them in exclude_ids (labeled), so b must be in [1, {unlabeled}]"
        )
    if held_out is not None and state_dict is None:
        raise ValueError("held-out rows are tested with the model: give its state_dict")
    start = time.perf_counter()
    state_ref = grad_ref = None
    if strategy != "random" or state_dict is not None:
        _check_model_inputs(model_cfg, state_dict, grad_sum, scoring_cfg)
        state_ref = ray.put({n: t.detach().cpu() for n, t in state_dict.items()})
        if strategy == "dynamic" and grad_sum is not None:
            grad_ref = ray.put({n: t.detach().cpu() for n, t in grad_sum.items()})
    # Rows excluded en masse (a pool subsample, a large labeled set) are not read at all; a few are dropped later.
    only = pool_ids[candidates] if unlabeled < READ_ALL_ABOVE * info.num_rows else None
    parts = with_held_out(read_pool(info, columns=("id", "image"), ids=only, preserve_order=False), held_out)
    outputs = on_actors(
        [decode_ahead(rows, scoring_cfg, transform, on_bad, exclude) for rows in parts], PoolScorer,
        scorer_actors(scoring_cfg), scoring_cfg.batch_size, "a ray_dal.pipeline.pool_scoring.PoolScorer actor",
        model_cfg=model_cfg, state_ref=state_ref, grad_ref=grad_ref, strategy=strategy, gamma=scoring_cfg.gamma,
        scope=scoring_cfg.scope, seed=seed, budget=int(budget), exclude_ids=exclude, transform=transform,
        on_bad=on_bad,
    )
    merged, skipped, num_scored, tally = TopB(int(budget)), [], 0, Tally()
    # The bar counts samples done (scored, tested or skipped).
    with console.progress(unlabeled + (held_out.count if held_out else 0),
                          "score" if held_out is None else "test+score", "img") as bar:
        for out in outputs:
            bad, test = out["skipped"], out[HELD_OUT]
            top = ~bad & ~test
            merged.add(out["id"][top], out["score"][top], pred=out["pred"][top], prob=out["prob"][top])
            skipped.append(out["id"][bad & ~test])
            num_scored += int(out["num_scored"].sum())
            bar.update(int(out["num_scored"].sum()) + int((bad & ~test).sum()) + tally.add(out))
    seconds = time.perf_counter() - start
    ids, scores = merged.result()
    predicted = merged.columns()
    skipped_ids = sorted_ids(skipped)
    if ids.size < budget:
        raise ConfigError(
            f"budget b = {budget} exceeds the {num_scored} samples that could be scored "
            f"({skipped_ids.size} bad image(s) skipped, e.g. ids {skipped_ids[:10].tolist()}); lower b"
        )
    tested = None if held_out is None else tally.result()
    return PoolQuery(ids=ids, scores=scores, num_scored=num_scored, seconds=seconds, skipped_ids=skipped_ids,
                     pred=predicted.get("pred", np.empty(0, np.int64)), prob=predicted.get("prob", np.empty(0)),
                     tested=tested)


@contextlib.contextmanager
def _first_output(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``model``'s outputs while the block runs; ``[0]`` is the first call's (the logits scored)."""
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda _m, _args, output: seen.append(output))
    try:
        yield seen
    finally:
        handle.remove()


def _check_model_inputs(model_cfg: ModelConfig, state_dict, grad_sum, scoring_cfg: ScoringConfig) -> None:
    """Fail on the driver, before any actor starts, when the weights or G do not fit the model."""
    if state_dict is None:
        raise ValueError(f"strategy {scoring_cfg.strategy!r} needs the model's state_dict; got None")
    model = load_model(model_cfg, check_weights(model_cfg, state_dict, "state_dict"))
    if scoring_cfg.strategy == "dynamic" and float(scoring_cfg.gamma) != 0:
        check_grad_sum(scoped_parameters(model, scoring_cfg.scope), grad_sum)
