"""Connecting to Ray: an existing cluster under `ray job submit`, else an embedded local one."""

from __future__ import annotations

import os

import ray
from ray.data import DataContext

from .. import console


def init_ray(num_cpus: int | None = None, no_progress_timeout_s: float = 600.0) -> None:
    """Start or join Ray once per process, make stuck Ray Data stages fail fast, and turn off Ray Data's
    progress bars (ray_dal draws its own: `ray_dal.console.progress`) and its console notices of errors.

    Under ``ray job submit`` (``RAY_ADDRESS`` set) this joins that cluster and ``num_cpus`` is ignored;
    otherwise it starts an embedded local cluster in this process (``address="local"``), even when
    another cluster runs on the machine, without Ray Train's preemption watcher (one machine has no
    preemptible nodes). Inside a `ray_dal.console.session`, Ray's output goes to the session's log file.
    """
    if not ray.is_initialized():
        with console.starting_ray():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=True)
            else:
                os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    context = DataContext.get_current()
    context.enable_progress_bars = False
    # A worker's error reaches the caller as an exception; its full trace goes to Ray Data's log file, without
    # the console notice of an "abbreviated stack trace below" that the console never shows.
    context.log_internal_stack_trace = True
    set_no_progress_timeout(no_progress_timeout_s)


def set_no_progress_timeout(seconds: float) -> None:
    """Fail (``ExecutionTimeoutError``) a Ray Data execution that makes no progress for ``seconds``."""
    DataContext.get_current().execution_no_progress_timeout_s = float(seconds)


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
