"""One active-learning round on Ray: fit the model with Ray Train, sum the labeled gradient G, test accuracy.

- `prepare_labeled(pool, ids)`: the labeled set decoded once per round (columns ``id``, ``x``, ``label``).
- `fit_round(...) -> RoundFit`: DDP training on Ray Train workers, then G over every labeled sample,
  computed by the same workers and all-reduced.
- `evaluate(...)` / `count_correct(...)`: exact test accuracy on actors (`ray_dal.pipeline.scorer_pool`).

Progress. `fit_round` runs ``trainer.fit()`` in a thread while the calling thread draws bars
(`ray_dal.console.progress`) from what rank 0 puts into a queue: each epoch with its training accuracy,
then G's progress. The queue is a ``ray.util.queue.Queue`` (an actor without CPUs), or a plain
``queue.Queue`` when training runs in this process. Ctrl-C then stops the driver at once, not through
Ray Train's graceful abort (which needs ``fit()`` on the main thread).

Sharding. Ray Train's default split (``streaming_split(equal=True)``) drops rows to equalise shards,
which would silently change G. Instead the driver partitions the labeled ids (a seeded permutation,
dealt round-robin: shard sizes differ by at most one) and every worker reads the materialised labeled
set once per round (``DataConfig(datasets_to_split=[])``), keeps the rows whose ids it was dealt and
checks it got all of them. Every labeled sample is then trained on once per epoch, counted once in the
training accuracy and once in G.

Steps. Each epoch every worker cuts its shuffled shard into the same number of steps S
(``ceil(N / batch_size)``, at most the smallest shard), and scales its summed loss so that DDP's
gradient average equals the gradient of the mean CE over the step's *global* batch: the same update
one process would make on the union of the workers' batches. ``train_cfg.batch_size`` is the global
batch size.

Checkpoints. Rank 0 reports a checkpoint (``model.pt``: epoch, model, optimizer, training accuracy,
done flag) after the first epoch that ends ``train.checkpoint_every_s`` after the previous one (0: every
epoch) and after the last epoch, under ``<storage_dir>/<name>/epoch_NNNN`` (the latest two are kept).
A worker that dies restarts from the latest one (``max_failures``). Calling `fit_round` again with
the same ``storage_dir``/``name`` resumes that run (Ray Train restores it); ``round.json`` there holds
a fingerprint of the round's inputs, and a different round under the same name is refused.
``storage_dir`` may be a local path or an object-store URI (`ray_dal.storage.location`): Ray Train then
reads and writes its checkpoints through the store's pyarrow filesystem, credentials from each process's
own environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import queue
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer
from ray.data import DataContext, ExecutionOptions
from ray.data.extensions import ArrowTensorArray
from ray.util.queue import Queue as RayQueue
from torch import nn

from .. import console
from .actors import actor_device, check_weights, load_model, use_cpu_share
from .held_out import count_right, test_batch
from ..config import ExperimentConfig, ModelConfig, TrainConfig, validate
from ..data import (DEFAULT_TRANSFORM, ImageTransform, PoolInfo, aligned_labels, preprocess_batch, read_labeled,
                    read_pool, read_rows)
from ..errors import carried, carry, original_errors
from ..models import build_model
from .runtime import cluster_has_gpus
from .scorer_pool import Actors, on_actors, one_actor_per_pass, release_scorers
from ..scoring import labeled_gradient, scoped_parameters
from ..storage import Location, location

DATASET = "labeled"
CHECKPOINT_FILE = "model.pt"
FINGERPRINT_FILE = "round.json"
KEEP_CHECKPOINTS = 2


class TrainingError(RuntimeError):
    """A round failed inside Ray Train; the message names the round and the underlying error."""


@dataclass
class RoundFit:
    """What one round's fit returns to the driver (everything on CPU)."""

    state_dict: dict[str, torch.Tensor]  # trained model, plain keys (no DDP "module." prefix)
    grad_sum: dict[str, torch.Tensor] | None  # G over all labeled samples, float32, keys as named_parameters()
    train_accuracy: float  # in [0, 1], over every labeled sample in the last epoch (train-mode forward)
    epochs: int  # epochs trained in this round, including any done before a resume
    train_seconds: float  # rank 0's wall time in the epoch loop (this attempt)
    grad_seconds: float  # rank 0's wall time for G, all-reduce included (0 when not computed)
    resumed_from_epoch: int = 0  # the checkpoint epoch the final attempt started from (0: from init_state)
    workers: int = 0  # Ray Train workers that trained (0: this process; `train_workers`)


# ----------------------------------------------------------------------------------------- labeled set


def prepare_labeled(
    pool: PoolInfo | str, ids: np.ndarray, transform: ImageTransform = DEFAULT_TRANSFORM, on_bad: str = "fail",
    labels: np.ndarray | None = None, here: bool = False,
) -> ray.data.Dataset:
    """Read the rows ``ids`` of ``pool``, decode them once and materialise: columns ``id``, ``x``, ``label``.

    ``label`` comes from ``labels`` (aligned with ``ids``) when given, else from the pool's label column.
    ``here``: read and decode in this process, not in a Ray Data pass (for a set this process trains on: no
    tasks to start, ~0.1 s for 1,000 CIFAR-10 images against 0.7-14 s for a pass on 2 cores); the same rows.
    Otherwise the run's warm scorer actors are released first (`ray_dal.pipeline.scorer_pool`).

    Raises ``ValueError`` for empty, non-integer or duplicate ids, or ids the pool does not hold, and
    ``ImageDecodeError`` (with the ids) for images that cannot be used; under ``on_bad="skip"`` those
    rows are left out instead (`dataset_ids` tells which ids remain).
    """
    ids = _check_ids(ids)
    if here:
        return _decoded_here(pool, ids, transform, on_bad, labels)
    release_scorers()  # for Ray Train's workers, which need the cluster: its warm scorer actors go first
    rows = read_pool(pool, ids=ids) if labels is None else read_labeled(pool, ids, labels)
    labeled = rows.map_batches(
        carry(preprocess_batch), batch_format="numpy", fn_kwargs={"transform": transform, "on_bad": on_bad}
    )
    with original_errors("the decoding of the labeled set"):
        labeled = carried(labeled).materialize()
    found = labeled.count()
    if found != len(ids) and not (on_bad == "skip" and found < len(ids)):
        raise ValueError(f"the pool holds {found} of the {len(ids)} requested labeled ids")
    labeled.context.enable_progress_bars = False  # the workers' re-reads of this small set need no bars
    return labeled


def _decoded_here(pool: PoolInfo | str, ids: np.ndarray, transform: ImageTransform, on_bad: str,
                  labels: np.ndarray | None) -> ray.data.Dataset:
    """`prepare_labeled` in this process: the rows read with `read_rows`, decoded in slices of 1,024 images."""
    if labels is not None:
        ids, labels = aligned_labels(ids, labels)
    table = read_rows(pool, ids, ("id", "image") if labels is not None else ("id", "image", "label"))
    parts = []
    for start in range(0, len(ids), 1024):
        piece = table.slice(start, 1024)
        batch = {name: piece.column(name).to_numpy(zero_copy_only=False) for name in piece.column_names}
        if labels is not None:
            batch["label"] = labels[start : start + 1024]
        parts.append(preprocess_batch(batch, transform=transform, on_bad=on_bad))
    parts = [p for p in parts if len(p["id"])]
    if not parts:
        raise ValueError(f"none of the {len(ids)} labeled images could be decoded (data.on_bad_image: skip)")
    decoded = {name: np.concatenate([p[name] for p in parts]) for name in ("id", "x", "label")}
    return ray.data.from_arrow(pa.table({"id": decoded["id"], "x": ArrowTensorArray.from_numpy(decoded["x"]),
                                         "label": decoded["label"]}))


def _check_ids(ids: Any) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"ids hold duplicates, e.g. {uniq[counts > 1][:5].tolist()}")
    return ids


def dataset_ids(labeled: ray.data.Dataset) -> np.ndarray:
    """The ``id`` column of the labeled set (checked unique), after checking its columns."""
    columns = set(labeled.columns() or ())
    missing = {"id", "x", "label"} - columns
    if missing:
        raise ValueError(
            f"the labeled dataset lacks column(s) {sorted(missing)} (has {sorted(columns)}); "
            "build it with ray_dal.pipeline.training.prepare_labeled"
        )
    chunks = [b["id"] for b in labeled.select_columns(["id"]).iter_batches(batch_format="numpy", batch_size=None)]
    return _check_ids(np.concatenate(chunks) if chunks else np.empty(0, np.int64))


def deal_shards(ids: np.ndarray, num_shards: int, seed: int) -> list[np.ndarray]:
    """A seeded, balanced partition of ``ids`` (sizes differ by at most one); independent of input order."""
    perm = np.random.default_rng(seed).permutation(np.sort(ids))
    return [np.sort(perm[r::num_shards]) for r in range(num_shards)]


def step_plan(shard_sizes: list[int], batch_size: int) -> tuple[int, np.ndarray]:
    """Steps per epoch S and the global batch size of each step when every shard is cut in S pieces."""
    n = sum(shard_sizes)
    steps = max(1, min(math.ceil(n / batch_size), min(shard_sizes)))
    counts = np.zeros(steps, np.int64)
    for size in shard_sizes:  # np.array_split: the first size % S pieces get one more row
        counts += size // steps + (np.arange(steps) < size % steps)
    return steps, counts


# ------------------------------------------------------------------------------------------- fitting


def fit_round(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    labeled: ray.data.Dataset,
    init_state: dict[str, torch.Tensor] | None,
    *,
    seed: int,
    storage_dir: str | Path | Location,
    name: str,
    scope: str = "all",
    compute_grad_sum: bool = True,
    max_failures: int = 2,
) -> RoundFit:
    """Train ``init_state`` (or a ``seed``-initialised model) on ``labeled`` with Ray Train, then compute G.

    ``labeled`` is `prepare_labeled`'s output (columns ``id``, ``x``, ``label``). The round stops after
    ``train_cfg.max_epochs`` epochs or once the epoch's training accuracy reaches
    ``train_cfg.train_accuracy``. ``train_cfg.num_workers = 0`` runs the loop in this process (Ray
    Train's local mode: no checkpoints, no retries); ``"auto"`` is resolved by `train_workers`. Workers first
    release the run's warm scorer actors (`ray_dal.pipeline.scorer_pool`). Raises `TrainingError` when Ray
    Train fails.
    """
    _check_fit_inputs(model_cfg, train_cfg, init_state, scope, name, max_failures)
    train_cfg = replace(train_cfg, num_workers=train_workers(train_cfg))
    storage = _storage(storage_dir)
    ids = dataset_ids(labeled)
    world = max(train_cfg.num_workers, 1)
    if len(ids) < world:
        raise ValueError(f"the labeled set has {len(ids)} rows, fewer than train.num_workers = {world}")
    use_gpu = _uses_gpu(train_cfg)
    local = train_cfg.num_workers == 0
    if not local:
        _claim_run_dir(storage / name, _fingerprint(model_cfg, train_cfg, ids, init_state, seed))
        release_scorers()  # warm scorer actors hold CPUs (GPUs) the workers may need: the next pass starts new ones

    config = {
        "model_cfg": asdict(model_cfg),
        "train_cfg": asdict(train_cfg),
        "init_state": None if init_state is None else ray.put(_cpu(init_state)),
        "shards": deal_shards(ids, world, seed),
        "seed": int(seed),
        "scope": scope,
        "compute_grad_sum": bool(compute_grad_sum),
        "checkpoint": not local,
        "progress": queue.Queue() if local else RayQueue(actor_options={"num_cpus": 0}),
    }
    resources = {"CPU": float(train_cfg.cpus_per_worker)}  # use_gpu adds {"GPU": 1}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            **_storage_options(storage),
            name=name,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        ),
        datasets={DATASET: labeled},
        dataset_config=DataConfig(datasets_to_split=[], execution_options=_ingest_options()),
    )
    try:
        result = _fit_showing_progress(trainer, config["progress"], train_cfg.max_epochs)
    except Exception as e:  # Ray wraps worker errors (TrainingFailedError); name the round
        raise TrainingError(f"round {name!r} (storage {storage / name}) failed: {type(e).__name__}: {e}") from e
    finally:
        if not local:
            config["progress"].shutdown()
    if result.return_value is None:
        raise TrainingError(f"round {name!r} (storage {storage / name}) finished without a result from rank 0")
    out = dict(result.return_value)
    out.update(torch.load(io.BytesIO(out.pop("tensors")), map_location="cpu", weights_only=True))
    return RoundFit(**out, workers=train_cfg.num_workers)


def train_workers(train_cfg: TrainConfig) -> int:
    """``train.num_workers`` as a count; ``"auto"``: 0 (train in this process) when training would use no
    GPU (``use_gpu`` False, or None on a cluster without GPUs), else 1 (one Ray Train worker on a GPU)."""
    if train_cfg.num_workers != "auto":
        return int(train_cfg.num_workers)
    return 1 if _uses_gpu(train_cfg) else 0


def _uses_gpu(train_cfg: TrainConfig) -> bool:
    return cluster_has_gpus() if train_cfg.use_gpu is None else bool(train_cfg.use_gpu)


def _ingest_options() -> ExecutionOptions:
    """Ray Train's default ingest options, built without the deprecated ``exclude_resources`` (which
    ``DataConfig`` passes, with a deprecation warning, when given none)."""
    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=current.preserve_order,
                            verbose_progress=current.verbose_progress)


def _fit_showing_progress(trainer: TorchTrainer, updates, max_epochs: int):
    """``trainer.fit()`` in a thread, while this thread mirrors the bars rank 0 describes in ``updates``."""
    outcome: dict[str, Any] = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray_dal fit", daemon=True)
    thread.start()
    bar = console.progress(max_epochs, "train", _UNITS["train"])
    bar.set_postfix("starting workers")
    try:
        while True:
            finished = not thread.is_alive()  # read before draining: rank 0's puts all precede fit()'s return
            try:
                update = updates.get_nowait() if finished else updates.get(timeout=0.5)
            except queue.Empty:
                if finished:
                    break
                bar.refresh()
                continue
            bar = _show(bar, **update)
    finally:
        bar.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


_UNITS = {"train": "epoch", "G": "img"}  # the stages rank 0 reports


def _show(bar, stage: str, n: int, total: int, postfix: str, start: bool):
    """Bring ``bar`` (swapped for a new one when the stage changed) to rank 0's state; close it when complete."""
    if bar.closed or bar.desc != stage:  # G follows the epochs; epochs follow G again only after a restart
        bar.close()
        bar = console.progress(total, stage, _UNITS[stage])
    bar.update(n - bar.n)  # backwards after a restart from an earlier checkpoint
    if start:
        bar.restart_clock()
    bar.set_postfix(postfix)
    if n >= total:
        bar.close()
    return bar


def _check_fit_inputs(model_cfg, train_cfg, init_state, scope, name, max_failures) -> None:
    """Fail on the driver, before Ray Train starts (a worker error would be retried ``max_failures`` times)."""
    validate(ExperimentConfig(model=model_cfg, train=train_cfg))
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"name must be a non-empty folder name, got {name!r}")
    if max_failures < -1:
        raise ValueError(f"max_failures must be >= -1 (-1: retry forever), got {max_failures}")
    model = build_model(model_cfg.name, model_cfg.num_classes, model_cfg.in_channels)
    scoped_parameters(model, scope)  # raises for an unknown scope or a model without a final Linear
    if init_state is not None:
        check_weights(model_cfg, init_state, "init_state")


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _fingerprint(model_cfg, train_cfg, ids, init_state, seed) -> str:
    """A digest of what defines the trained model (not worker count, resources or G's scope)."""
    h = hashlib.sha256()
    t = train_cfg
    h.update(json.dumps([asdict(model_cfg), t.max_epochs, t.train_accuracy, t.lr, t.batch_size, int(seed)]).encode())
    h.update(np.sort(ids).tobytes())
    for key, value in sorted((init_state or {}).items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _storage(storage_dir: str | Path | Location) -> Location:
    """``storage_dir`` as a `Location` (a local path made absolute, symlinks resolved: Train workers chdir)."""
    storage = location(storage_dir)
    return location(Path(storage.path).resolve()) if storage.is_local else storage


def _storage_options(storage: Location) -> dict[str, Any]:
    """`RunConfig`'s storage arguments: a local path as it is; in an object store ``bucket/prefix`` (no
    scheme) with the store's filesystem (a scheme next to a filesystem fails inside Train's controller)."""
    if storage.is_local:
        return {"storage_path": storage.path}
    return {"storage_path": storage.path, "storage_filesystem": storage.fs}


def _claim_run_dir(run_dir: Location, fingerprint: str) -> None:
    """Record the round's fingerprint in ``run_dir``; refuse a folder that belongs to another round."""
    marker = run_dir / FINGERPRINT_FILE
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(
                f"{run_dir} holds checkpoints of a different round (other data, model, seed or settings); "
                "use another name or delete the folder"
            )
        return
    run_dir.mkdir()
    marker.write_text(json.dumps({"fingerprint": fingerprint}))


# ----------------------------------------------------------------------------------- on each worker


def _train_loop(config: dict) -> dict | None:
    """Ray Train worker: load the shard, train (resuming from a checkpoint), G, rank 0 returns the result."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model_cfg, train_cfg = ModelConfig(**config["model_cfg"]), TrainConfig(**config["train_cfg"])
    threads = max(1, round(train_cfg.cpus_per_worker))
    with _torch_threads(threads if config["checkpoint"] else None):
        device = ray.train.torch.get_device()
        shards = config["shards"]
        x, y = _load_shard(ray.train.get_dataset_shard(DATASET), shards[rank], rank)

        ddp, module, optimizer, (epoch, accuracy, done) = _model_and_optimizer(config, model_cfg, train_cfg)
        resumed_from_epoch = epoch

        total = sum(len(s) for s in shards)
        steps, step_counts = step_plan([len(s) for s in shards], train_cfg.batch_size)
        start = last_report = time.perf_counter()
        if rank == 0:
            _tell(config["progress"], "train", epoch, train_cfg.max_epochs, start=True)
        while not done:
            order = np.random.default_rng([config["seed"], epoch, rank]).permutation(len(y))
            correct, seen = _train_epoch(ddp, optimizer, x, y, np.array_split(order, steps), step_counts, world, device)
            # rank 0's clock decides when to checkpoint: every rank must call report() the same number of times
            due = int(rank == 0 and time.perf_counter() - last_report >= train_cfg.checkpoint_every_s)
            counts = torch.tensor([correct, seen, due], dtype=torch.int64, device=device)  # NCCL: on the device
            correct, seen, due = _all_reduce_sum(counts).tolist()
            if seen != total:
                raise RuntimeError(f"epoch {epoch + 1} trained on {seen} samples, expected {total}")
            epoch, accuracy = epoch + 1, correct / seen
            if rank == 0:
                _tell(config["progress"], "train", epoch, train_cfg.max_epochs, f"accuracy {accuracy:.3f}")
            target = train_cfg.train_accuracy
            done = epoch >= train_cfg.max_epochs or (target is not None and accuracy >= target)
            if done or due:  # a report costs ~0.1-1 s (a barrier, a checkpoint written): not every short epoch
                _report(epoch, accuracy, done, module, optimizer, rank, config["checkpoint"])
                last_report = time.perf_counter()
        train_seconds = time.perf_counter() - start

        _broadcast_buffers(module)  # DDP leaves each rank with its own BN running stats after the last step
        grad_sum, grad_seconds = None, 0.0
        if config["compute_grad_sum"]:
            start = time.perf_counter()
            batches = ((x[i : i + train_cfg.batch_size].to(device), y[i : i + train_cfg.batch_size].to(device))
                       for i in range(0, len(y), train_cfg.batch_size))
            if rank == 0:
                batches = _telling(config["progress"], batches, world, total)
            grad_sum = _all_reduce_sum(labeled_gradient(module, batches, config["scope"]))
            if rank == 0:
                _tell(config["progress"], "G", total, total)  # every worker's share is in the sum now
            grad_seconds = time.perf_counter() - start
    if rank != 0:
        return None
    tensors = {
        "state_dict": _cpu(module.state_dict()),
        "grad_sum": None if grad_sum is None else {k: v.detach().cpu().float() for k, v in grad_sum.items()},
    }
    buffer = io.BytesIO()  # Ray Train refuses return values holding tensors; torch.save keeps them exact
    torch.save(tensors, buffer)
    return {"tensors": buffer.getvalue(), "train_accuracy": float(accuracy), "epochs": int(epoch),
            "train_seconds": train_seconds, "grad_seconds": grad_seconds, "resumed_from_epoch": resumed_from_epoch}


def _tell(updates, stage: str, n: int, total: int, postfix: str = "", start: bool = False) -> None:
    """Tell the driver where ``stage`` stands (``start``: it begins now); never fail training over it (the driver
    may have stopped listening)."""
    try:
        updates.put_nowait({"stage": stage, "n": n, "total": total, "postfix": postfix, "start": start})
    except Exception:
        pass


def _telling(updates, batches, world: int, total: int):
    """``batches`` (this worker's share), telling the driver after each about how many of all ``total`` samples G
    has covered: ``world`` times this worker's count (the shares differ by one sample at most)."""
    _tell(updates, "G", 0, total, start=True)
    done = 0
    for xb, yb in batches:
        yield xb, yb
        done += len(yb)
        _tell(updates, "G", min(done * world, total - 1), total)  # the last count comes after the all-reduce


def _model_and_optimizer(config: dict, model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The (DDP-wrapped) model, its plain module and a fresh Adam, restored from Ray Train's latest
    checkpoint when there is one (else from ``init_state``, else a seeded init), with (epoch, accuracy, done)."""
    torch.manual_seed(config["seed"])
    model = build_model(model_cfg.name, model_cfg.num_classes, model_cfg.in_channels)
    if config["init_state"] is not None:
        model.load_state_dict(ray.get(config["init_state"]))
    resume = _read_checkpoint(ray.train.get_checkpoint())
    if resume is not None:
        model.load_state_dict(resume["model"])
    ddp = ray.train.torch.prepare_model(model)  # moves to the worker's device; DDP when world > 1
    module = ddp.module if isinstance(ddp, nn.parallel.DistributedDataParallel) else ddp
    optimizer = torch.optim.Adam(ddp.parameters(), lr=train_cfg.lr)
    if resume is None:
        return ddp, module, optimizer, (0, 0.0, False)
    optimizer.load_state_dict(resume["optimizer"])
    return ddp, module, optimizer, (resume["epoch"], resume["train_accuracy"], resume["done"])


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (``None``: leave the process's setting alone)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _load_shard(iterator, shard_ids: np.ndarray, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the whole labeled set once, keep the rows of ``shard_ids`` (sorted by id); all must be there."""
    ids, xs, ys = [], [], []
    for batch in iterator.iter_batches(batch_format="numpy", batch_size=None):
        keep = np.isin(batch["id"], shard_ids)
        ids.append(batch["id"][keep])
        xs.append(np.asarray(batch["x"][keep], dtype=np.float32))
        ys.append(batch["label"][keep])
    got = np.concatenate(ids) if ids else np.empty(0, np.int64)
    if len(got) != len(shard_ids) or not np.array_equal(np.sort(got), shard_ids):
        raise RuntimeError(
            f"worker {rank} found {len(got)} rows for its {len(shard_ids)} labeled ids "
            "(the labeled dataset changed or holds duplicate ids)"
        )
    order = np.argsort(got, kind="stable")
    x = torch.from_numpy(np.concatenate(xs)[order])
    y = torch.from_numpy(np.concatenate(ys)[order].astype(np.int64))
    return x, y


def _train_epoch(ddp, optimizer, x, y, pieces, step_counts, world, device) -> tuple[int, int]:
    """One epoch; step s's loss is scaled so DDP's average is the mean CE over the global batch."""
    ddp.train()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for idx, count in zip(pieces, step_counts):
        idx = torch.from_numpy(idx)
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        logits = ddp(xb)
        loss = F.cross_entropy(logits, yb, reduction="sum") * (world / float(count))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.detach().argmax(dim=1) == yb).sum()
        seen += len(idx)
    return int(correct.item()), seen


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(values):
    """Sum a tensor, or a dict of tensors (one flat all-reduce), over the workers; identity when alone."""
    if not _distributed():
        return values
    if isinstance(values, torch.Tensor):
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values
    flat = torch.cat([v.reshape(-1) for v in values.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    for k, v in values.items():
        out[k] = flat[offset : offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def _broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics)."""
    if _distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def _report(epoch, accuracy, done, module, optimizer, rank, checkpoint: bool) -> None:
    """All ranks report the epoch's metrics; rank 0 attaches the checkpoint."""
    metrics = {"epoch": epoch, "train_accuracy": accuracy, "done": done}
    if not (checkpoint and rank == 0):
        ray.train.report(metrics)
        return
    state = {"epoch": epoch, "train_accuracy": accuracy, "done": done,
             "model": module.state_dict(), "optimizer": optimizer.state_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=f"epoch_{epoch:04d}")


def _read_checkpoint(checkpoint: Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------ evaluate


class _Evaluator:
    """Ray Data actor: the model loaded once; each batch becomes rows of (correct, n, id, skipped).

    The first row holds the batch's counts ``correct`` and ``n`` (``skipped`` False); each further
    row holds the ``id`` of an image that could not be decoded under ``on_bad="skip"`` (counts 0).
    """

    def __init__(self, model_cfg: dict, state, decode: bool, transform: ImageTransform, use_gpu: bool,
                 on_bad: str = "fail"):
        use_cpu_share()
        self.device = actor_device(use_gpu)
        self.model = load_model(model_cfg, state, self.device)
        self.decode, self.transform, self.on_bad = decode, transform, on_bad

    @carry
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        skipped = np.empty(0, np.int64)
        if self.decode:
            correct, tested, skipped = test_batch(self.model, batch, self.transform, self.on_bad, self.device)
        else:
            correct, tested = count_right(self.model, batch["x"], batch["label"], self.device), len(batch["label"])
        counts = np.zeros((2, 1 + skipped.size), np.int64)
        counts[:, 0] = correct, tested
        return {"correct": counts[0], "n": counts[1], "id": np.concatenate([np.zeros(1, np.int64), skipped]),
                "skipped": np.arange(1 + skipped.size) > 0}


def count_correct(
    model_cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    test: ray.data.Dataset,
    *,
    batch_size: int = 512,
    actors: Actors | None = None,
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
    name: str = "test",
) -> tuple[int, int, np.ndarray]:
    """(correct, rows evaluated, ids of images skipped under ``on_bad="skip"``) of the model on ``test``.

    ``test`` has columns ``x``, ``label`` (decoded) or ``image``, ``label`` and optionally ``id``
    (decoded in the actors; bad images raise ``ImageDecodeError`` or, under "skip", are left out and
    listed). Runs on ``actors`` (`ray_dal.pipeline.scorer_pool`; default: one 0.5-CPU actor for this pass, with
    a GPU when the cluster has them). ``name`` labels the progress bar ("test", "eval").
    """
    actors = actors or one_actor_per_pass()
    if batch_size < 1 or actors.count < 1 or actors.cpus < 0:
        raise ValueError(f"need batch_size >= 1, at least 1 actor and CPUs per actor >= 0; got {batch_size}, {actors}")
    columns = set(test.columns() or ())
    if {"x", "label"} <= columns:
        decode, keep = False, ["x", "label"]
    elif {"image", "label"} <= columns:
        decode, keep = True, [c for c in ("id", "image", "label") if c in columns]
    else:
        raise ValueError(f"the test dataset needs columns x, label or image, label; it has {sorted(columns)}")
    outputs = on_actors(test.select_columns(keep), _Evaluator, actors, batch_size,
                        "a ray_dal.pipeline.training evaluation actor", model_cfg=asdict(model_cfg),
                        state=ray.put(_cpu(state_dict)), decode=decode, transform=transform, use_gpu=actors.gpus > 0,
                        on_bad=on_bad)
    correct = total = 0
    skipped = []
    with console.progress(test._meta_count(), name, "img") as bar:  # rows known without executing, else None
        for batch in outputs:
            correct += int(batch["correct"].sum())
            total += int(batch["n"].sum())
            skipped.append(batch["id"][batch["skipped"]])
            bar.update(int(batch["n"].sum() + batch["skipped"].sum()))
    return correct, total, np.sort(np.concatenate(skipped)) if skipped else np.empty(0, np.int64)


def evaluate(model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor], test: ray.data.Dataset, **kwargs) -> float:
    """Exact accuracy (correct / rows, over every usable row of ``test``); arguments as `count_correct`."""
    correct, total, _ = count_correct(model_cfg, state_dict, test, **kwargs)
    if total == 0:
        raise ValueError("the test dataset is empty")
    return correct / total
