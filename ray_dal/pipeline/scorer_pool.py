"""Scorer actors that live for the whole run: one process start and one ``import torch`` per run, not per pass.

``scoring.scorer_lifetime: run`` (the default). Ray Data still reads the pool, decodes it in map tasks under
``scoring.decode: tasks`` and streams it; the driver hands each batch-sized slice of a block to the least busy
actor as the block's ObjectRef (never the data), at most `IN_FLIGHT` per actor, and pulls the next blocks only
as slices are handed out, so a million-row pool never piles up in the object store. Each pass ships its own
callable class and arguments (with the model's and G's ObjectRefs) once, to the object store; an actor builds that
callable on the pass's first batch and calls it on each batch as ``map_batches`` would, so a pass's outputs do not
depend on the lifetime.
``scorer_lifetime: pass`` keeps Ray Data's own actor pool, started and stopped by every pass.

Faults: the actors are created as Ray Data creates its pools' (``max_restarts=-1, max_task_retries=-1``): an
actor that dies, alone or with its node, is restarted, rebuilds the pass's callable from the reference its retried
call carries and redoes the batch; blocks lost with a node are rebuilt by Ray from their read tasks.

Resources: the actors hold their CPUs (and GPUs) between passes, and a pass's Ray Data work gets what they leave.
`release_scorers` frees them; whatever else needs the cluster calls it first: a pass on Ray Data's own pool, and
a Ray Train fit with workers and its labeled set's preparation (`ray_dal.pipeline.training`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import itertools
import logging
import threading
import uuid
from typing import Any, Iterator

import numpy as np
import ray
from ray.data import ExecutionResources
from ray.data.exceptions import ExecutionTimeoutError

from ..config import ConfigError
from ..data import READ_CPUS
from ..errors import carry, carried, original_errors
from .runtime import cluster_has_gpus

log = logging.getLogger("ray_dal")
IN_FLIGHT = 2  # batches queued on one actor: the next is there when the last ends


@dataclasses.dataclass(frozen=True)
class Actors:
    """How many actors, what each reserves, how long they live: ``"run"`` (a `ScorerPool`) or ``"pass"``."""

    count: int
    cpus: float
    gpus: float
    lifetime: str = "run"


def one_actor_per_pass() -> Actors:
    """The default of a pass outside the scorers' settings (tests, a library call): one 0.5-CPU actor started for
    the pass, with a GPU when the cluster has them."""
    return Actors(1, 0.5, 1 if cluster_has_gpus() else 0, "pass")


class ScorerActor:
    """A Ray actor that runs each pass's callable on the batches it is handed (module docstring)."""

    def __init__(self):
        importlib.import_module("ray_dal.pipeline.pool_scoring")  # torch and ray_dal: most of a start-up, paid here
        self.key: str | None = None
        self.fn: Any = None

    def run(self, key: str, spec: list, block: Any, start: int, stop: int) -> dict[str, np.ndarray]:
        """The pass ``key``'s callable (built from ``ray.get(spec[0])`` on its first batch here) on rows
        ``[start, stop)`` of ``block``, as a numpy batch."""
        from ray.data.block import BlockAccessor

        if key != self.key:
            self.fn = None  # the last pass's model goes before this pass's is loaded
            actor_class, kwargs = ray.get(spec[0])
            self.fn, self.key = carry(actor_class)(**kwargs), key
        rows = BlockAccessor.for_block(block).slice(start, stop, copy=False)
        return self.fn(BlockAccessor.for_block(rows).to_batch_format("numpy"))


class ScorerPool:
    """The driver's handles on `Actors` ``shape``'s actors (created when the pool is, started asynchronously)."""

    def __init__(self, shape: Actors, node_id: str):
        self.shape, self.node_id = shape, node_id
        remote = ray.remote(ScorerActor).options(num_cpus=shape.cpus, num_gpus=shape.gpus, max_restarts=-1,
                                                 max_task_retries=-1)
        self.actors = [remote.remote() for _ in range(shape.count)]

    def stream(self, parts: list[ray.data.Dataset], actor_class: type, kwargs: dict[str, Any], batch_size: int,
               no_progress_s: float) -> Iterator[dict[str, np.ndarray]]:
        """The outputs of ``actor_class(**kwargs)`` on every ``batch_size``-row batch of each of ``parts`` (one after
        the other), as they finish."""
        spec = [ray.put((actor_class, kwargs))]
        key = uuid.uuid4().hex
        total = ray.cluster_resources()
        left = ExecutionResources(cpu=total.get("CPU", 0) - self.shape.cpus * self.shape.count,
                                  gpu=total.get("GPU", 0) - self.shape.gpus * self.shape.count)
        for ds in parts:
            ds.context.execution_options.resource_limits = left  # Ray Data's share: what the actors leave
        # Every part starts now (a later part's first blocks are ready when the one before ends), consumed in order.
        bundles = itertools.chain(*[ds.iter_internal_ref_bundles() for ds in parts])
        todo: collections.deque = collections.deque()  # (block ref, start, stop) not yet handed out
        running: dict[ray.ObjectRef, int] = {}  # output ref -> actor index
        load = [0] * len(self.actors)
        more = True
        while True:
            while more and len(todo) < IN_FLIGHT * len(self.actors):
                bundle = next(bundles, None)
                if bundle is None:
                    more = False
                else:
                    todo.extend(_slices(bundle, batch_size))
            while todo and min(load) < IN_FLIGHT:
                i = int(np.argmin(load))
                ref, start, stop = todo.popleft()
                running[self.actors[i].run.remote(key, spec, ref, start, stop)] = i
                load[i] += 1
            if not running:
                return
            done, _ = ray.wait(list(running), num_returns=1, timeout=no_progress_s)
            if not done:
                raise ExecutionTimeoutError(
                    f"no scorer actor finished a batch in {no_progress_s:.0f} s (runtime.no_progress_timeout_s): "
                    "they may wait for resources another job holds, or a batch takes longer: raise the timeout")
            for ref in done:
                load[running.pop(ref)] -= 1
                yield ray.get(ref)


def _slices(bundle: Any, batch_size: int) -> Iterator[tuple[ray.ObjectRef, int, int]]:
    """(block ref, start row, stop row) of ``batch_size``-row slices covering a Ray Data ``RefBundle``."""
    for ref, meta, part in zip(bundle.block_refs, bundle.metadata, bundle.slices):
        start, stop = (0, meta.num_rows) if part is None else (part.start_offset, part.end_offset)
        for first in range(start, stop, batch_size):
            yield ref, first, min(stop, first + batch_size)


_pool: ScorerPool | None = None  # this process's scorer actors
_ray_data_started: str | None = None  # the node id of the driver whose cluster has run a Ray Data pass


def scorer_pool(shape: Actors) -> ScorerPool:
    """This run's pool of ``shape``: the live one when it has that shape in this Ray cluster, else a new one
    (the old one released first: two pools could hold every CPU between them)."""
    global _pool
    node = ray.get_runtime_context().get_node_id()
    if _pool is not None and _pool.shape == shape and _pool.node_id == node:
        return _pool
    release_scorers()
    _check_fits(shape)
    _pool = ScorerPool(shape, node)
    return _pool


def start_early(shape: Actors) -> None:
    """Start what the next passes need now, so that it overlaps other work (the driver's training): the run's
    pool (lifetime "run") and, once per cluster, Ray Data itself, with a one-row pass in a background thread (a
    process's first pass otherwise pays ~1.4 s more than the next: 2-core VM, CPU)."""
    global _ray_data_started
    if shape.lifetime == "run":
        scorer_pool(shape)
    node = ray.get_runtime_context().get_node_id()
    if _ray_data_started != node:
        _ray_data_started = node
        threading.Thread(target=_one_row_pass, name="ray_dal-start-ray-data", daemon=True).start()


def _one_row_pass() -> None:
    try:
        ray.data.range(1).materialize()
    except Exception:  # only a head start: the real passes report their own errors
        log.debug("Ray Data's early start failed", exc_info=True)


def release_scorers() -> None:
    """Kill the run's scorer actors, if any, freeing their CPUs and GPUs; the next pass starts new ones."""
    global _pool
    if _pool is not None and ray.is_initialized() and _pool.node_id == ray.get_runtime_context().get_node_id():
        for actor in _pool.actors:
            ray.kill(actor)
    _pool = None


def _check_fits(shape: Actors) -> None:
    """`ConfigError` when the actors would leave no CPU for the pool's read tasks, or ask for more GPUs than exist."""
    total = ray.cluster_resources()
    cpus, gpus = shape.count * shape.cpus, shape.count * shape.gpus
    fix = ("Fix: lower scoring.num_scorers or scoring.cpus_per_scorer / gpus_per_scorer, or set "
           "scoring.scorer_lifetime: pass (Ray Data's per-pass pool, e.g. on an autoscaling cluster)")
    if cpus + READ_CPUS > total.get("CPU", 0):
        raise ConfigError(f"{shape.count} scorer actors x {shape.cpus} CPUs = {cpus} CPUs leave less than the "
                          f"{READ_CPUS} CPU a read task needs on this cluster of {total.get('CPU', 0):g} CPUs. {fix}")
    if gpus > total.get("GPU", 0):
        raise ConfigError(f"{shape.count} scorer actors x {shape.gpus} GPUs = {gpus} GPUs, the cluster has "
                          f"{total.get('GPU', 0):g}. {fix}")


def on_actors(parts: ray.data.Dataset | list[ray.data.Dataset], actor_class: type, shape: Actors, batch_size: int,
              where: str, **kwargs: Any) -> Iterator[dict[str, np.ndarray]]:
    """Every output batch (numpy) of ``actor_class(**kwargs)`` called on ``batch_size``-row numpy batches of a
    dataset or of the ``parts`` of one pass (one schema), on actors of ``shape``: this run's `ScorerPool` (lifetime
    "run": the parts streamed one after the other) or a Ray Data actor pool started for this pass ("pass": over
    their union). An actor's own exception is raised as itself, noting ``where`` it was raised."""
    from ray.data.context import DataContext

    parts = [parts] if isinstance(parts, ray.data.Dataset) else list(parts)
    timeout = DataContext.get_current().execution_no_progress_timeout_s
    with original_errors(where):
        if shape.lifetime == "run":
            yield from scorer_pool(shape).stream([carried(ds) for ds in parts], actor_class, kwargs, batch_size,
                                                 timeout)
            return
        ds = functools.reduce(ray.data.Dataset.union, parts)
        release_scorers()  # Ray Data's pool beside warm actors could leave no CPU for the reads: one at a time
        mapped = ds.map_batches(actor_class, compute=ray.data.ActorPoolStrategy(size=shape.count),
                                num_cpus=shape.cpus, num_gpus=shape.gpus, batch_size=batch_size,
                                batch_format="numpy", fn_constructor_kwargs=kwargs)
        yield from carried(mapped).iter_batches(batch_size=None, batch_format="numpy")
