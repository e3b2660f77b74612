"""Connecting to Ray: an existing cluster under `ray job submit`, else an embedded local one."""

from __future__ import annotations

import os

import ray
from ray.data import DataContext

from .. import console

# An embedded cluster keeps up to 8 idle worker processes for 10 minutes instead of killing them at once, so
# the next Ray Data pass's actors and read tasks start in processes that have imported torch already
# (../shared/notes/ray-startup.md: a fresh 10k-image pass 7.9 -> 4.3 s; ~170 MiB per idle worker).
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": 8, "idle_worker_killing_time_threshold_ms": 600_000}
# Ray Train's controller polls its workers this often (default 2 s): a finished fit returns sooner.
TRAIN_HEALTH_CHECK_INTERVAL_S = "0.1"


def init_ray(num_cpus: int | None = None, no_progress_timeout_s: float = 600.0) -> None:
    """Start or join Ray once per process, make stuck Ray Data stages fail fast, and turn off Ray Data's
    progress bars (ray_dal draws its own: `ray_dal.console.progress`) and its console notices of errors.

    Under ``ray job submit`` (``RAY_ADDRESS`` set) this joins that cluster and ``num_cpus`` is ignored;
    otherwise it starts an embedded local cluster in this process (``address="local"``), even when
    another cluster runs on the machine, without Ray Train's preemption watcher (one machine has no
    preemptible nodes), keeping idle workers (`LOCAL_SYSTEM_CONFIG`) and polling Train workers often
    (`TRAIN_HEALTH_CHECK_INTERVAL_S`; a variable already set wins). Inside a `ray_dal.console.session`,
    Ray's output goes to the session's log file.
    """
    if not ray.is_initialized():
        with console.starting_ray():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=True)
            else:
                os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
                os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_HEALTH_CHECK_INTERVAL_S)
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         _system_config=LOCAL_SYSTEM_CONFIG)
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
