"""One active-learning round, wherever its labels come from: the dataset (simulation) or people.

`run_round`: train on S with Ray Train (continuing from the given weights with a fresh optimiser),
compute G in the same workers, measure accuracy on held-out labeled samples, choose the next query of
any strategy (Ray Data), and commit ``round_NNN/`` atomically (`ray_dal.loop.run_dir`; Ray Train's
checkpoints go to the run's ``ray_train/``, on disk or in the same bucket). The simulated
loop (`ray_dal.loop.simulation`) and ``ray-dal round`` (`ray_dal.loop.annotated`) both call it: a
simulated round is a round whose labels come from the dataset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ExperimentConfig
from ..data import DATASETS, ImageTransform, PoolInfo, preprocess_batch, read_labeled, read_pool, read_rows
from ..models import available_models, build_model
from ..pipeline.actors import check_weights, load_model, scorer_actors
from ..pipeline.training import count_correct, dataset_ids, fit_round, prepare_labeled, train_workers
from ..pipeline.held_out import HeldOutRows, Tested
from ..pipeline.scorer_pool import start_early
from ..pipeline.pool_scoring import PoolQuery
from ..scoring import approximation_ratio
from .query import Labeled, select_query
from .run_dir import Round, RunDir

log = logging.getLogger("ray_dal")


@dataclass
class Evaluation:
    """Held-out labeled samples of ``pool``: the round's metrics get ``<name>_accuracy`` on them and
    ``skipped_<name>_ids`` (images that could not be decoded). ``labels`` aligned with ``ids``, or None to
    take the pool's own ``label`` column.
    """

    name: str  # "test" (the dataset's test split) or "eval" (people's held-out labels)
    pool: PoolInfo
    ids: np.ndarray
    labels: np.ndarray | None = None


@dataclass
class RoundInputs:
    """What round ``index`` works on. ``labeled_ids`` sorted unique, ``labels`` int64 aligned with them."""

    index: int
    pool: PoolInfo
    transform: ImageTransform
    labeled_ids: np.ndarray
    labels: np.ndarray
    exclude_ids: np.ndarray  # pool ids never queried, besides S (outside the pool subsample, held out)
    budget: int | None  # samples to query; None: this round only trains and evaluates
    evaluation: Evaluation | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # added to the round's metrics.json as they are


def check_registered(cfg: ExperimentConfig) -> None:
    """`ConfigError` unless ``data.dataset`` and ``model.name`` name a registered dataset and model."""
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset = {cfg.data.dataset!r} is not supported; choose one of {sorted(DATASETS)}")
    if cfg.model.name not in available_models():
        raise ConfigError(f"model.name = {cfg.model.name!r} is not a registered model; choose one of "
                          f"{available_models()} or register yours with ray_dal.models.register_model")


def latest_weights(cfg: ExperimentConfig, run: RunDir, last: Round | None) -> dict:
    """The weights the next round starts from: the ``last`` completed round's (checked), else a fresh
    model seeded by ``loop.seed``."""
    if last is not None:
        return check_weights(cfg.model, last.state_dict, str(run.round_path(last.index) / "model.pt"))
    torch.manual_seed(cfg.loop.seed)
    m = cfg.model
    return build_model(m.name, m.num_classes, m.in_channels).state_dict()


def run_round(cfg: ExperimentConfig, run: RunDir, rnd: RoundInputs, state: dict) -> tuple[dict, dict]:
    """Run and commit one round; returns (the trained state_dict, the round's metrics)."""
    round_start = time.perf_counter()
    r, on_bad = rnd.index, cfg.data.on_bad_image
    seed = cfg.loop.seed * 10_000 + r
    train_cfg = replace(cfg.train, num_workers=train_workers(cfg.train))  # "auto" resolved once a round
    here = train_cfg.num_workers == 0
    if here:
        start_early(scorer_actors(cfg.scoring))  # warm scorers start (once a run) while this process trains
    train_set = prepare_labeled(rnd.pool, rnd.labeled_ids, rnd.transform, on_bad=on_bad, labels=rnd.labels,
                                here=here)  # decoded where it is trained
    skipped = np.setdiff1d(rnd.labeled_ids, dataset_ids(train_set)) if on_bad == "skip" else np.empty(0, np.int64)
    fit_start = time.perf_counter()
    fit = fit_round(
        cfg.model, train_cfg, train_set, state,
        seed=seed, storage_dir=run.root / "ray_train", name=f"round_{r:03d}", scope=cfg.scoring.scope,
        compute_grad_sum=cfg.scoring.strategy == "dynamic",
    )
    fit_end = time.perf_counter()
    check_weights(cfg.model, fit.state_dict, f"round {r}'s trained model (train.lr = {cfg.train.lr})")
    query = None
    if rnd.budget is not None:
        history = _albl_history(run, r) if cfg.scoring.strategy == "albl" else ()
        query = select_query(
            rnd.pool, Labeled(rnd.labeled_ids, rnd.labels, history), model_cfg=cfg.model,
            state_dict=fit.state_dict, grad_sum=fit.grad_sum, scoring_cfg=cfg.scoring, budget=rnd.budget,
            exclude_ids=np.union1d(rnd.labeled_ids, rnd.exclude_ids), seed=seed, transform=rnd.transform,
            on_bad=on_bad, held_out=None if rnd.evaluation is None else _held_out(rnd.evaluation),
        )
        skipped = np.union1d(skipped, query.skipped_ids)
    if query is not None and query.tested is not None:  # tested in the scoring pass: no time of its own
        accuracy, eval_seconds, skipped_eval = _accuracy(rnd.evaluation, query.tested), None, query.tested.skipped_ids
    else:
        accuracy, eval_seconds, skipped_eval = _evaluate(cfg, rnd, fit.state_dict)
    approximation = _approximation(cfg, rnd, fit.state_dict, fit.grad_sum, query)
    metrics = {
        "round": r,
        "n_labeled": int(len(rnd.labeled_ids)),
        **({f"{rnd.evaluation.name}_accuracy": accuracy} if rnd.evaluation is not None else {}),
        "train_accuracy": fit.train_accuracy,
        "epochs": fit.epochs,
        "train_seconds": fit.train_seconds,
        "grad_seconds": fit.grad_seconds,
        "train_workers": fit.workers,  # 0: trained in the driver (train.num_workers, "auto" resolved)
        "prepare_seconds": fit_start - round_start,  # S read and decoded (here when trained here, else Ray Data)
        "train_startup_seconds": fit_end - fit_start - fit.train_seconds - fit.grad_seconds,  # Ray Train's start
        "eval_seconds": eval_seconds,  # None: tested in the scoring pass (score_seconds covers both)
        "score_seconds": None if query is None else query.seconds,
        "pool_size": int(rnd.pool.num_rows - len(rnd.labeled_ids) - len(rnd.exclude_ids)),  # unlabeled samples
        "samples_per_second": None if query is None else query.samples_per_second,
        "round_seconds": time.perf_counter() - round_start,  # the whole round up to its commit, every start-up included
        "strategy": cfg.scoring.strategy,
        "skipped_ids": skipped.tolist(),  # pool images that could not be decoded (on_bad_image: skip): never queried
        **({f"skipped_{rnd.evaluation.name}_ids": skipped_eval.tolist()} if rnd.evaluation is not None else {}),
        **rnd.metrics,
        **approximation,
        **(query.info if query is not None else {}),  # e.g. ALBL's bandit state, the candidate count
    }
    run.write_round(r, rnd.labeled_ids, rnd.labels, fit.state_dict, metrics, _columns(query))
    if skipped.size or skipped_eval.size:
        log.warning("round %d skipped %d pool and %d held-out image(s) that could not be decoded, e.g. ids %s", r,
                    skipped.size, skipped_eval.size, np.concatenate([skipped, skipped_eval])[:10].tolist())
    log.info("round %d: %d labeled, %s, train %.1fs, score %s", r, len(rnd.labeled_ids),
             "no held-out labels" if accuracy is None else f"{rnd.evaluation.name} accuracy {accuracy:.4f}",
             fit.train_seconds,
             "-" if query is None else f"{query.seconds:.1f}s ({query.samples_per_second:.0f}/s)")
    return fit.state_dict, metrics


def _evaluate(cfg: ExperimentConfig, rnd: RoundInputs, state_dict: dict) -> tuple[float | None, float, np.ndarray]:
    """(accuracy or None without held-out samples, seconds, ids of held-out images that could not be decoded)."""
    ev = rnd.evaluation
    if ev is None:
        return None, 0.0, np.empty(0, np.int64)
    start = time.perf_counter()
    correct, tested, skipped = count_correct(
        cfg.model, state_dict, _held_out(ev).rows, actors=scorer_actors(cfg.scoring), transform=rnd.transform,
        on_bad=cfg.data.on_bad_image, name=ev.name)
    return _accuracy(ev, Tested(correct, tested, skipped)), time.perf_counter() - start, skipped


def _held_out(ev: Evaluation) -> HeldOutRows:
    """The held-out rows to test on (id, image, label), labels from ``ev.labels`` or else the pool's."""
    rows = read_pool(ev.pool, ids=ev.ids) if ev.labels is None else read_labeled(ev.pool, ev.ids, ev.labels)
    return HeldOutRows(rows, len(ev.ids))


def _accuracy(ev: Evaluation, tested: Tested) -> float:
    if tested.tested == 0:
        raise ConfigError(f"no held-out image of {ev.pool.source} could be decoded; see data.on_bad_image")
    return tested.correct / tested.tested


def _approximation(cfg: ExperimentConfig, rnd: RoundInputs, state_dict: dict, grad_sum: dict | None,
                   query: PoolQuery | None) -> dict[str, float]:
    """Dynamic AL's subset approximation ratio R(Q|S) of the query (`ray_dal.scoring.approximation_ratio`), with
    its cost in seconds; nothing for other strategies. The b queried images are decoded here, on the driver."""
    if query is None or cfg.scoring.strategy != "dynamic":
        return {}
    start = time.perf_counter()
    rows = read_rows(rnd.pool, query.ids, ("image",)).to_pydict()
    x = torch.from_numpy(preprocess_batch(rows, transform=rnd.transform)["x"])
    model = load_model(cfg.model, state_dict)
    ratio = approximation_ratio(model, x, grad_sum, scope=cfg.scoring.scope, batch_size=cfg.scoring.batch_size)
    return {"approximation_ratio": ratio.ratio, "approximation_seconds": time.perf_counter() - start}


def _albl_history(run: RunDir, r: int) -> list[dict]:
    """ALBL's state and query of each round before ``r``, as `select_query` continues the bandit from them."""
    return [{"selected_ids": run.selected_ids(k), "albl": m["albl"]} for k, m in enumerate(run.metrics()[:r])]


def _columns(query: PoolQuery | None) -> dict[str, np.ndarray] | None:
    return None if query is None else {"id": query.ids, "score": query.scores, "pred": query.pred, "prob": query.prob}
