"""Fault injection from outside, as a crash would happen: find Ray worker processes in /proc and kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

# Scorer processes by their title: a pass's Ray Data pool (named after the UDF it runs) or the run's warm actors.
SCORERS = (b"MapBatches(PoolScorer)", b"ray::ScorerActor")


def is_scorer(pid: int) -> bool:
    return any(name in title(pid) for name in SCORERS)


def is_busy(pid: int) -> bool:
    """Whether scorer ``pid`` runs a batch now (its title names the method: ``.submit`` or ``.run``)."""
    return any(method in title(pid) for method in (b").submit", b"ScorerActor.run"))


def descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (e.g. this test's own Ray cluster, never another one), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def title(pid: int) -> bytes:
    """The process title Ray sets: ``ray::<actor>.<method>`` while a task runs, ``ray::<actor>`` when idle."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class KillMidScoring:
    """In a thread: once a scorer actor has finished a batch and started another, kill it (once).

    ``candidates()`` returns ``{pid: tag}`` of the scorer processes that may be killed (polled every
    0.2 s); ``kill(pid, tag)`` does the deed (default SIGKILL). A batch is seen finished when the
    process title goes busy -> idle, so the kill lands mid-way through a later batch. On a loaded
    machine that idle moment can be too short to see (Ray queues the next batch on the actor), so an
    actor seen busy for ``busy_s`` in all is killed as well: by then it is well into its work. Use as a
    context manager around the scoring call; ``killed`` is the victim's pid (None: no kill happened).
    """

    def __init__(self, candidates: Callable[[], dict[int, object]], kill: Callable[[int, object], None] | None = None,
                 timeout_s: float = 600, busy_s: float = 0.5):
        self.candidates, self.timeout_s, self.busy_s = candidates, timeout_s, busy_s
        self.kill = kill or (lambda pid, tag: os.kill(pid, signal.SIGKILL))
        self.killed: int | None = None
        self.tag = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "KillMidScoring":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        phase: dict[int, int] = {}  # 0: not seen busy, 1: busy, 2: finished a batch
        busy_for: dict[int, float] = {}  # seconds each actor was seen busy
        tags: dict[int, object] = {}
        deadline, next_scan, last = time.monotonic() + self.timeout_s, 0.0, time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            step, last = now - last, now
            if now >= next_scan:
                tags.update(self.candidates())
                next_scan = now + 0.2
            for pid, tag in tags.items():
                busy = is_busy(pid)
                state = phase.setdefault(pid, 0)
                busy_for[pid] = busy_for.get(pid, 0.0) + (step if busy and state else 0.0)
                if busy and (state == 2 or busy_for[pid] >= self.busy_s):
                    self.kill(pid, tag)
                    self.killed, self.tag = pid, tag
                    return
                if busy != (state == 1):
                    phase[pid] = 1 if busy else (2 if state == 1 else 0)
            time.sleep(0.001)


def local_scorers() -> dict[int, None]:
    """Scorer actor processes of this process's own Ray cluster."""
    return {pid: None for pid in descendants(os.getpid()) if is_scorer(pid)}


def kill_job_when(argv: list[str], condition: Callable[[int], bool], what: str, timeout_s: float = 600) -> None:
    """Start ``argv`` in its own session; once ``condition(pid)`` holds, SIGKILL it with its embedded Ray."""
    job = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not condition(job.pid):
            assert job.poll() is None, f"the job ended before {what}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s"
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


# A run that writes round 0 (tiny) then round 1 with a model.pt of ``argv[2]`` float32 values into run dir
# ``argv[1]``: large enough that a kill lands while round 1 is being written (on disk or uploaded).
ROUND_WRITER = """
import sys
import numpy as np, torch
from ray_dal.config import ExperimentConfig
from ray_dal.loop.run_dir import RunDir
run, ids = RunDir(sys.argv[1]), np.arange(10)
run.start(ExperimentConfig())
for r, size in ((0, 1), (1, int(sys.argv[2]))):
    run.write_round(r, ids, ids % 10, {"w": torch.ones(size)}, {"round": r}, {"id": ids[:2], "score": np.ones(2)})
"""
