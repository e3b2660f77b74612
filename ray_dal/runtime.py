"""Connecting to Ray: an existing cluster under `ray job submit`, else an embedded local one."""

from __future__ import annotations

import os

import ray
from ray.data import DataContext


def init_ray(num_cpus: int | None = None, no_progress_timeout_s: float = 600.0) -> None:
    """Start or join Ray once per process, and make stuck Ray Data stages fail fast.

    Under ``ray job submit`` (``RAY_ADDRESS`` set) this joins that cluster and ``num_cpus`` is ignored;
    otherwise it starts an embedded local cluster in this process (``address="local"``), even when
    another cluster runs on the machine.
    """
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    set_no_progress_timeout(no_progress_timeout_s)


def set_no_progress_timeout(seconds: float) -> None:
    """Fail (``ExecutionTimeoutError``) a Ray Data execution that makes no progress for ``seconds``."""
    DataContext.get_current().execution_no_progress_timeout_s = float(seconds)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
