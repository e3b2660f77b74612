"""Small machines must not hang: a stage that cannot make progress fails after the configured time."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ray.data import DataContext
from ray.data.exceptions import ExecutionTimeoutError

from ray_dal.config import ConfigError, ModelConfig, ScoringConfig
from ray_dal.models import build_model
from ray_dal.pipeline.pool_scoring import score_pool
from ray_dal.pipeline.runtime import set_no_progress_timeout


def score_on_a_gpu(pool, lifetime: str) -> None:
    """Score with a scorer that asks for a GPU, which this CPU-only cluster does not have."""
    score_pool(pool, model_cfg=ModelConfig(), state_dict=build_model("cnn", 10).state_dict(), grad_sum=None,
               scoring_cfg=ScoringConfig(strategy="entropy", num_scorers=1, gpus_per_scorer=1,
                                         scorer_lifetime=lifetime),
               budget=10, exclude_ids=np.empty(0, np.int64), seed=0)


def test_a_stuck_scoring_stage_fails_after_the_no_progress_timeout(ray_local, cifar10_slice):
    before = DataContext.get_current().execution_no_progress_timeout_s
    set_no_progress_timeout(5)
    try:
        start = time.monotonic()
        # Ray Data's pool of a scorer that can never start: without the guard this waits forever.
        with pytest.raises(ExecutionTimeoutError, match="made no progress for at least 5s"):
            score_on_a_gpu(cifar10_slice / "test.parquet", "pass")
        assert time.monotonic() - start < 60
    finally:
        set_no_progress_timeout(before)


def test_warm_scorers_that_cannot_fit_the_cluster_are_refused_before_they_start(ray_local, cifar10_slice):
    with pytest.raises(ConfigError, match=r"1 scorer actors x 1 GPUs = 1 GPUs, the cluster has 0.*lifetime: pass"):
        score_on_a_gpu(cifar10_slice / "test.parquet", "run")
    with pytest.raises(ConfigError, match=r"4 scorer actors x 0.5 CPUs = 2.0 CPUs leave less than the 0.25 CPU"):
        score_pool(cifar10_slice / "test.parquet", model_cfg=ModelConfig(), state_dict=None, grad_sum=None,
                   scoring_cfg=ScoringConfig(strategy="random", num_scorers=4), budget=10,
                   exclude_ids=np.empty(0, np.int64), seed=0)
