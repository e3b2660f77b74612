"""The simulated active-learning loop: the dataset's labels are the oracle.

Round r = 0..R (`ray_dal.loop.rounds.run_round`): train on S (Ray Train, continuing from round r-1's
model with a fresh optimiser), compute G, measure test accuracy, and, for r < R, score the unlabeled
pool (Ray Data) and add the top-b query, labeled by the dataset, to S. Every round is committed
atomically to the run directory (`ray_dal.loop.run_dir`); re-running the same command resumes after
the last complete round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError, ExperimentConfig
from ..data import DATASETS, ImageTransform, PoolInfo, inspect_pool, read_labels
from ..pipeline.runtime import init_ray
from ..storage import RunLease
from .rounds import Evaluation, RoundInputs, check_registered, latest_weights, run_round
from .run_dir import RunDir

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
    check_registered(cfg)
    dataset = DATASETS[cfg.data.dataset]
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
    """Run (or resume) the experiment of ``cfg`` to its last round; returns its run directory.

    Holds the run directory's lease (`ray_dal.storage.RunLease`) throughout: a second process on the same
    run directory is refused with `RunBusyError` naming this one.
    """
    run = RunDir(cfg.loop.out)
    exp = load_experiment(cfg)  # every check of the data, the config and the run folder comes before Ray starts
    with RunLease(run.root):
        _run_rounds(cfg, run, exp)
    return run


def _run_rounds(cfg: ExperimentConfig, run: RunDir, exp: Experiment) -> None:
    run.start(cfg)
    done = run.completed_rounds()
    if done and done[-1] >= cfg.loop.rounds:
        log.info("%s already holds all %d rounds; nothing to do", run.root, cfg.loop.rounds + 1)
        return
    last = run.load(done[-1]) if done else None
    state = latest_weights(cfg, run, last)
    if last is not None:
        labeled = np.union1d(last.labeled_ids, last.selected_ids)
        log.info("resuming %s after round %d (%d labeled)", run.root, last.index, len(labeled))
    else:
        labeled = np.sort(np.random.default_rng(cfg.loop.seed).choice(exp.pool_ids, cfg.loop.initial, replace=False))
    init_ray(cfg.runtime.num_cpus, cfg.runtime.no_progress_timeout_s)
    test = Evaluation("test", exp.test, exp.test_ids)
    for r in range(len(done), cfg.loop.rounds + 1):
        labels = exp.pool_labels[np.searchsorted(exp.pool_ids, labeled)]  # the oracle
        budget = cfg.loop.budget if r < cfg.loop.rounds else None
        state, _ = run_round(cfg, run, RoundInputs(r, exp.train, exp.transform, labeled, labels, exp.outside_pool,
                                                   budget, test), state)
        if budget is not None:
            labeled = np.union1d(labeled, run.load(r).selected_ids)
