"""The active-learning loop (simulation: the dataset's labels are the oracle).

Round r = 0..R: train on S (Ray Train, continuing from round r-1's model with a fresh optimiser),
compute G, measure test accuracy, and, for r < R, score the unlabeled pool (Ray Data) and add the
top-b query to S. Every round is committed atomically to the run directory (`ray_dal.run_dir`);
re-running the same command resumes after the last complete round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .actors import check_weights
from .config import ConfigError, ExperimentConfig
from .data import DATASETS, ImageTransform, PoolInfo, inspect_pool, read_labels, read_pool
from .models import available_models, build_model
from .query import Labeled, select_query
from .run_dir import RunDir
from .runtime import init_ray
from .training import count_correct, dataset_ids, fit_round, prepare_labeled

log = logging.getLogger("ray_dal")


@dataclass
class Experiment:
    """The pools of one experiment and the sample ids it uses (all resolved before any training)."""

    train: PoolInfo
    test: PoolInfo
    pool_ids: np.ndarray  # ids that may be labeled or queried (sorted)
    pool_labels: np.ndarray  # the oracle: pool_labels[i] is the label of pool_ids[i]
    outside_pool: np.ndarray  # ids of the training file left out by data.pool_size: never scored
    test_ids: np.ndarray
    transform: ImageTransform  # the dataset's preprocessing (data.image_size applied)


def load_experiment(cfg: ExperimentConfig) -> Experiment:
    """Resolve the data and check the model and the loop's sizes against it, before any expensive work.

    Reads footers and the id/label columns only (no image, no Ray). Raises `ConfigError` or
    ``PoolError`` naming the value and the fix.
    """
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(f"data.dataset = {cfg.data.dataset!r} is not supported; choose one of {sorted(DATASETS)}")
    dataset = DATASETS[cfg.data.dataset]
    if cfg.model.name not in available_models():
        raise ConfigError(f"model.name = {cfg.model.name!r} is not a registered model; choose one of "
                          f"{available_models()} or register yours with ray_dal.models.register_model")
    train_path, test_path = dataset.resolve(cfg.data.data_dir)
    train, test = inspect_pool(train_path), inspect_pool(test_path)
    rng = np.random.default_rng(cfg.loop.seed)
    ids, labels = read_labels(train)
    pool_ids = _subsample(ids, cfg.data.pool_size, rng, "data.pool_size")
    all_test_ids, test_labels = read_labels(test)
    test_ids = _subsample(all_test_ids, cfg.data.test_size, rng, "data.test_size")
    lp = cfg.loop
    needed = lp.initial + lp.rounds * lp.budget
    if needed > len(pool_ids):
        raise ConfigError(
            f"loop.initial + loop.rounds * loop.budget = {lp.initial} + {lp.rounds} x {lp.budget} = {needed} "
            f"exceeds the pool's {len(pool_ids)} samples; lower them or raise data.pool_size"
        )
    for info, values in ((train, labels), (test, test_labels)):
        bad = np.unique(values[(values < 0) | (values >= cfg.model.num_classes)])
        if bad.size:
            raise ConfigError(f"{info.source} has labels {bad[:10].tolist()} outside [0, model.num_classes = "
                              f"{cfg.model.num_classes}). Fix: set model.num_classes to the number of classes")
    order = np.argsort(ids)
    pool_labels = labels[order][np.searchsorted(ids[order], pool_ids)]
    return Experiment(train, test, pool_ids, pool_labels, np.setdiff1d(ids, pool_ids), test_ids,
                      dataset.transform(cfg.data.image_size))


def _subsample(ids: np.ndarray, size: int | None, rng: np.random.Generator, key: str) -> np.ndarray:
    if size is None:
        return np.sort(ids)
    if not 1 <= size <= len(ids):
        raise ConfigError(f"{key} = {size} is invalid: the data has {len(ids)} samples")
    return np.sort(rng.choice(ids, size=size, replace=False))


def run_experiment(cfg: ExperimentConfig) -> RunDir:
    """Run (or resume) the experiment of ``cfg`` to its last round; returns its run directory."""
    run = RunDir(cfg.loop.out)
    exp = load_experiment(cfg)  # every check of the data, the config and the run folder comes before Ray starts
    run.start(cfg)
    done = run.completed_rounds()
    if done and done[-1] >= cfg.loop.rounds:
        log.info("%s already holds all %d rounds; nothing to do", run.root, cfg.loop.rounds + 1)
        return run
    if done:
        last = run.load(done[-1])
        state = check_weights(cfg.model, last.state_dict, str(run.round_path(done[-1]) / "model.pt"))
        labeled = np.union1d(last.labeled_ids, last.selected_ids)
        log.info("resuming %s after round %d (%d labeled)", run.root, done[-1], len(labeled))
    else:
        labeled = np.sort(np.random.default_rng(cfg.loop.seed).choice(exp.pool_ids, cfg.loop.initial, replace=False))
        torch.manual_seed(cfg.loop.seed)
        m = cfg.model
        state = build_model(m.name, m.num_classes, m.in_channels).state_dict()
    init_ray(cfg.runtime.num_cpus, cfg.runtime.no_progress_timeout_s)
    for r in range(len(done), cfg.loop.rounds + 1):
        state = _run_round(cfg, exp, run, r, labeled, state)
        if r < cfg.loop.rounds:
            labeled = np.union1d(labeled, run.load(r).selected_ids)
    return run


def _albl_history(run: RunDir, r: int) -> list[dict]:
    """ALBL's state and query of each round before ``r``, as `select_query` continues the bandit from them."""
    return [{"selected_ids": run.selected_ids(k), "albl": m["albl"]} for k, m in enumerate(run.metrics()[:r])]


def _run_round(cfg: ExperimentConfig, exp: Experiment, run: RunDir, r: int, labeled: np.ndarray, state) -> dict:
    round_start = time.perf_counter()
    labels = exp.pool_labels[np.searchsorted(exp.pool_ids, labeled)]
    seed = cfg.loop.seed * 10_000 + r
    on_bad = cfg.data.on_bad_image
    train_set = prepare_labeled(exp.train, labeled, exp.transform, on_bad=on_bad)
    skipped = np.setdiff1d(labeled, dataset_ids(train_set)) if on_bad == "skip" else np.empty(0, np.int64)
    fit = fit_round(
        cfg.model, cfg.train, train_set, state,
        seed=seed, storage_dir=run.root / "ray_train", name=f"round_{r:03d}", scope=cfg.scoring.scope,
        compute_grad_sum=cfg.scoring.strategy == "dynamic",
    )
    check_weights(cfg.model, fit.state_dict, f"round {r}'s trained model (train.lr = {cfg.train.lr})")
    start = time.perf_counter()
    correct, tested, skipped_test = count_correct(
        cfg.model, fit.state_dict, read_pool(exp.test, ids=exp.test_ids), num_actors=cfg.scoring.num_scorers,
        cpus_per_actor=cfg.scoring.cpus_per_scorer, transform=exp.transform, on_bad=on_bad)
    if tested == 0:
        raise ConfigError(f"no test image of {exp.test.source} could be decoded; see data.on_bad_image")
    eval_seconds = time.perf_counter() - start
    unlabeled = len(exp.pool_ids) - len(labeled)
    query = None
    if r < cfg.loop.rounds:
        history = _albl_history(run, r) if cfg.scoring.strategy == "albl" else ()
        query = select_query(
            exp.train, Labeled(labeled, labels, history), model_cfg=cfg.model, state_dict=fit.state_dict,
            grad_sum=fit.grad_sum, scoring_cfg=cfg.scoring, budget=cfg.loop.budget,
            exclude_ids=np.union1d(labeled, exp.outside_pool), seed=seed, transform=exp.transform, on_bad=on_bad,
        )
        skipped = np.union1d(skipped, query.skipped_ids)
    metrics = {
        "round": r,
        "n_labeled": int(len(labeled)),
        "test_accuracy": correct / tested,
        "train_accuracy": fit.train_accuracy,
        "epochs": fit.epochs,
        "train_seconds": fit.train_seconds,
        "grad_seconds": fit.grad_seconds,
        "eval_seconds": eval_seconds,
        "score_seconds": None if query is None else query.seconds,
        "pool_size": int(unlabeled),
        "samples_per_second": None if query is None else query.samples_per_second,
        "round_seconds": time.perf_counter() - round_start,  # the whole round: Ray Train start-up included
        "strategy": cfg.scoring.strategy,
        "skipped_ids": skipped.tolist(),  # pool images that could not be decoded (on_bad_image: skip): never queried
        "skipped_test_ids": skipped_test.tolist(),  # test images left out of test_accuracy
        **(query.info if query is not None else {}),  # e.g. ALBL's bandit state, the candidate count
    }
    run.write_round(r, labeled, labels, fit.state_dict, metrics,
                    None if query is None else (query.ids, query.scores))
    if skipped.size or skipped_test.size:
        log.warning("round %d skipped %d pool and %d test image(s) that could not be decoded, e.g. ids %s", r,
                    skipped.size, skipped_test.size, np.concatenate([skipped, skipped_test])[:10].tolist())
    log.info("round %d: %d labeled, test accuracy %.4f, train %.1fs, score %s", r, len(labeled), correct / tested,
             fit.train_seconds, "-" if query is None else f"{query.seconds:.1f}s ({query.samples_per_second:.0f}/s)")
    return fit.state_dict
