"""Rounds whose labels come from people: what ``ray-dal round`` runs.

One call is one round of `ray_dal.loop.rounds.run_round` on a real pool: train on every labeled id of
the labels file (continuing from the run's latest model), score the rest of the pool and commit
``RUN/round_NNN/`` with the next query. The pool's own ``label`` column, if any, is never read. Calling
again with the same labels does nothing; a labels file with more samples makes the next round; corrected
labels of earlier samples are taken and counted (``n_relabeled``). Everything is checked before Ray
starts, and bad input writes nothing. The pool, the labels files and the run directory may be local
paths or object-store URIs (`ray_dal.storage`); the round holds the run directory's lease
(`ray_dal.storage.RunLease`), so a second ``ray-dal round`` on the same run is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, ExperimentConfig
from ..data import DATASETS, PoolInfo, inspect_pool, load_labels, resolve_pool
from ..pipeline.runtime import init_ray
from ..storage import Location, RunLease
from .rounds import Evaluation, RoundInputs, check_registered, latest_weights, run_round
from .run_dir import RunDir

log = logging.getLogger("ray_dal")


@dataclass
class RoundResult:
    """What a ``ray-dal round`` call did: ``trained`` False when the labels were those of round ``index``."""

    run: RunDir
    index: int
    trained: bool
    metrics: dict

    @property
    def query_path(self) -> Location:
        return self.run.round_path(self.index) / "selected.parquet"


@dataclass
class _Labels:
    ids: np.ndarray  # sorted unique
    labels: np.ndarray  # int64 class indices


def run_annotated_round(cfg: ExperimentConfig, eval_labels: str | Path | None = None) -> RoundResult:
    """One round on ``cfg.data.data_dir`` (the pool) with the labels in ``cfg.loop.labels``, into ``cfg.loop.out``."""
    if cfg.loop.labels is None:
        raise ConfigError("loop.labels must name the labels file (--labels) of a round whose labels come from people")
    check_registered(cfg)
    pool = inspect_pool(resolve_pool(cfg.data.data_dir))
    labeled = _read(cfg.loop.labels, cfg, pool, "--labels")
    held_out = None if eval_labels is None else _read(eval_labels, cfg, pool, "--eval-labels")
    exclude = np.empty(0, np.int64) if held_out is None else held_out.ids
    both = np.intersect1d(labeled.ids, exclude)
    if both.size:
        raise ConfigError(f"{both.size} id(s) are both in --labels {cfg.loop.labels} and in --eval-labels "
                          f"{eval_labels}, e.g. {both[:10].tolist()}. Fix: held-out samples must not be trained on")
    unlabeled = pool.num_rows - labeled.ids.size - exclude.size
    if not 1 <= cfg.loop.budget <= unlabeled:
        raise ConfigError(f"--budget {cfg.loop.budget} is invalid: pool {pool.source} has {pool.num_rows} samples, "
                          f"{labeled.ids.size} labeled and {exclude.size} held out, so the budget must be in "
                          f"[1, {unlabeled}]")
    run = RunDir(cfg.loop.out)
    with RunLease(run.root):
        return _run_round(cfg, run, pool, labeled, held_out, exclude)


def _run_round(cfg: ExperimentConfig, run: RunDir, pool: PoolInfo, labeled: _Labels, held_out: _Labels | None,
               exclude: np.ndarray) -> RoundResult:
    run.start(cfg)  # refuses a run folder made with other settings
    done = run.completed_rounds()
    last = run.load(done[-1]) if done else None
    if last is not None and np.array_equal(last.labeled_ids, labeled.ids) \
            and np.array_equal(last.labeled_labels, labeled.labels):
        return RoundResult(run, last.index, False, run.metrics()[-1])
    change = _change(last, labeled)
    state = latest_weights(cfg, run, last)
    r = len(done)
    # Ray Train's checkpoints of a round that was never committed: its labels may have changed since, so
    # it starts again from the last committed model (Ray Train would refuse a folder of other inputs).
    (run.root / "ray_train" / f"round_{r:03d}").delete()
    init_ray(cfg.runtime.num_cpus, cfg.runtime.no_progress_timeout_s)
    evaluation = None if held_out is None else Evaluation("eval", pool, held_out.ids, held_out.labels)
    transform = DATASETS[cfg.data.dataset].transform(cfg.data.image_size)
    _, metrics = run_round(cfg, run, RoundInputs(r, pool, transform, labeled.ids, labeled.labels, exclude,
                                                 cfg.loop.budget, evaluation, change), state)
    return RoundResult(run, r, True, metrics)


def _read(path: str | Path, cfg: ExperimentConfig, pool: PoolInfo, flag: str) -> _Labels:
    return _Labels(*load_labels(path, pool, cfg.data.classes, cfg.model.num_classes, flag))


def _change(last, now: _Labels) -> dict[str, int]:
    """How the labels moved since the ``last`` round: new ids, ids whose label changed, ids no longer labeled."""
    if last is None:
        return {"n_new": int(now.ids.size), "n_relabeled": 0, "n_removed": 0}
    common, before_rows, now_rows = np.intersect1d(last.labeled_ids, now.ids, return_indices=True)
    changed = last.labeled_labels[before_rows] != now.labels[now_rows]
    return {"n_new": int(now.ids.size - common.size), "n_relabeled": int(changed.sum()),
            "n_removed": int(last.labeled_ids.size - common.size)}
