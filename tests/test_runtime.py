"""Small machines must not hang: a stage that cannot make progress fails after the configured time."""

from __future__ import annotations

import time

import numpy as np
import pytest
from ray.data import DataContext
from ray.data.exceptions import ExecutionTimeoutError

from ray_dal.config import ModelConfig, ScoringConfig
from ray_dal.models import build_model
from ray_dal.pipeline.pool_scoring import score_pool
from ray_dal.pipeline.runtime import set_no_progress_timeout


def test_a_stuck_scoring_stage_fails_after_the_no_progress_timeout(ray_local, cifar10_slice):
    before = DataContext.get_current().execution_no_progress_timeout_s
    set_no_progress_timeout(5)
    try:
        start = time.monotonic()
        # A scorer asking for a GPU on this CPU-only cluster can never start: without the guard this waits forever.
        with pytest.raises(ExecutionTimeoutError, match="made no progress for at least 5s"):
            score_pool(cifar10_slice / "test.parquet", model_cfg=ModelConfig(),
                       state_dict=build_model("cnn", 10).state_dict(), grad_sum=None,
                       scoring_cfg=ScoringConfig(strategy="entropy", num_scorers=1, gpus_per_scorer=1),
                       budget=10, exclude_ids=np.empty(0, np.int64), seed=0)
        assert time.monotonic() - start < 60
    finally:
        set_no_progress_timeout(before)
