"""fit_round / evaluate on a real local Ray and real CIFAR-10 rows.

The main Ray Train fits are module-scoped and reused: one with 2 workers on 201 samples (not
divisible by the worker count) during which a worker is SIGKILLed, and one with 1 worker continuing
from it. Train tests must run serially in one process (gloo ports). G is always checked against
`labeled_gradient` on the returned model over rows decoded without Ray.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
import torch.nn.functional as F

from ray_dal.config import ModelConfig, TrainConfig
from ray_dal.data import preprocess_batch, read_pool
from ray_dal.models import build_model
from ray_dal.scoring import labeled_gradient
from ray_dal.pipeline.scorer_pool import Actors
from ray_dal.pipeline.training import (
    RoundFit,
    TrainingError,
    deal_shards,
    evaluate,
    fit_round,
    prepare_labeled,
    step_plan,
    train_workers,
)

from .faults import descendants

MODEL = ModelConfig(name="cnn", num_classes=10)


def seeded_ids(num_rows: int, n: int, seed: int) -> np.ndarray:
    """A seeded random slice (the files are grouped by class: never a prefix)."""
    return np.sort(np.random.default_rng(seed).choice(num_rows, size=n, replace=False)).astype(np.int64)


def decode_rows(path: Path, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle's inputs: rows read with pyarrow (no Ray), decoded by the same preprocess_batch."""
    table = pq.read_table(path, columns=["image", "label"]).take(ids)
    batch = {"id": ids, "image": np.array(table.column("image").to_pylist(), dtype=object),
             "label": table.column("label").to_numpy()}
    out = preprocess_batch(batch)
    np.testing.assert_array_equal(out["id"], ids)
    return torch.from_numpy(out["x"]), torch.from_numpy(out["label"])


def trained_model(state: dict) -> torch.nn.Module:
    model = build_model("cnn", 10)
    model.load_state_dict(state)  # strict: plain keys, nothing missing or extra
    return model


def assert_grad_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    """Same keys; each tensor within rtol of the oracle in norm (a dropped or doubled sample is ~1/N off)."""
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == torch.float32 and got[k].device.type == "cpu"
        err = (got[k] - want[k]).norm() / want[k].norm()
        assert err < rtol, f"G[{k}] is {err:.2e} off (relative)"


@pytest.fixture(scope="module")
def train_path(cifar10_dir) -> Path:
    return cifar10_dir / "train.parquet"


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_runs")


def registered_epoch(run_dir: Path) -> int:
    """The latest epoch whose checkpoint Ray Train has registered (0: none yet)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def kill_a_train_worker_after(run_dir: Path, epoch: int, timeout_s: float = 300) -> dict:
    """In a thread: once Ray Train has registered ``epoch``'s checkpoint, SIGKILL one of our Train workers.

    Set ``record["stop"]`` when the fit returns, so a late watcher never kills a later test's workers.
    """
    record: dict = {"stop": threading.Event()}

    def watch():
        deadline = time.monotonic() + timeout_s
        while registered_epoch(run_dir) < epoch:
            if record["stop"].is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        for pid in descendants(os.getpid()):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmdline:
                os.kill(pid, signal.SIGKILL)
                record["killed"] = pid
                return

    record["thread"] = threading.Thread(target=watch, daemon=True)
    record["thread"].start()
    return record


@pytest.fixture(scope="module")
def fit2(ray_local, train_path, storage):
    """2 workers, 8 epochs on 201 samples (shards of 100 and 101); a worker is killed after epoch 2's checkpoint."""
    ids = seeded_ids(50_000, 201, seed=1)
    cfg = TrainConfig(max_epochs=8, train_accuracy=None, batch_size=64, num_workers=2, checkpoint_every_s=0)
    labeled = prepare_labeled(str(train_path), ids)
    killer = kill_a_train_worker_after(storage / "r0", epoch=2)
    try:
        fit = fit_round(MODEL, cfg, labeled, None, seed=0, storage_dir=storage, name="r0")
    finally:
        killer["stop"].set()
        killer["thread"].join()
    return ids, cfg, fit, killer.get("killed"), labeled


@pytest.fixture(scope="module")
def fit1(ray_local, train_path, storage, fit2):
    """1 worker continuing from fit2's model, a tiny lr and a tiny accuracy target, scope "last"."""
    ids = seeded_ids(50_000, 200, seed=2)
    cfg = TrainConfig(max_epochs=5, train_accuracy=1e-3, lr=1e-9, batch_size=64, num_workers=1)
    labeled = prepare_labeled(str(train_path), ids)
    fit = fit_round(MODEL, cfg, labeled, fit2[2].state_dict, seed=1, storage_dir=storage, name="r1", scope="last")
    return ids, cfg, fit


def test_fit_two_workers_survives_a_killed_worker_and_counts_every_sample_once(fit2, train_path, storage):
    ids, cfg, fit, killed, _ = fit2
    assert killed is not None, "the fault injection found no Ray Train worker to kill"
    assert isinstance(fit, RoundFit) and fit.epochs == 8
    assert 2 <= fit.resumed_from_epoch < 8  # restarted from a registered checkpoint, not from scratch
    assert fit.train_seconds > 0 and fit.grad_seconds > 0
    assert 0 <= fit.train_accuracy <= 1 and round(fit.train_accuracy * 201, 6).is_integer()
    model = trained_model(fit.state_dict)
    torch.manual_seed(0)
    fresh = build_model("cnn", 10).state_dict()
    assert all(not torch.equal(v, fresh[k]) for k, v in fit.state_dict.items())
    x, y = decode_rows(train_path, ids)
    assert_grad_close(fit.grad_sum, labeled_gradient(model, (x, y), "all"))
    # Checkpoints through Ray Train: the last two epochs, the latest holding the returned model.
    run = storage / "r0"
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0007", "epoch_0008"]
    saved = torch.load(run / "epoch_0008" / "model.pt", weights_only=True)
    assert saved["epoch"] == 8 and saved["done"] is True
    for k, v in fit.state_dict.items():
        assert torch.equal(saved["model"][k], v)


def test_fit_continues_from_init_state_and_stops_at_accuracy(fit1, fit2, train_path):
    ids, cfg, fit = fit1
    assert fit.epochs == 1 and fit.train_accuracy >= cfg.train_accuracy  # target reached after epoch 1 of 5
    start = fit2[2].state_dict
    assert fit.resumed_from_epoch == 0
    # lr 1e-9 for 4 Adam steps: the model moved by ~4e-9 from where it started, so it started at init_state.
    for k, v in fit.state_dict.items():
        assert torch.allclose(v, start[k], rtol=0, atol=1e-7), k
    model = trained_model(fit.state_dict)
    x, y = decode_rows(train_path, ids)
    with torch.no_grad():
        assert torch.allclose(F.cross_entropy(model(x), y), F.cross_entropy(trained_model(start)(x), y), atol=1e-6)
        fresh_loss = F.cross_entropy(build_model("cnn", 10)(x), y)
    assert not torch.allclose(F.cross_entropy(model(x), y), fresh_loss, atol=1e-3)
    assert sorted(fit.grad_sum) == ["fc3.bias", "fc3.weight"]
    assert_grad_close(fit.grad_sum, labeled_gradient(model, (x, y), "last"))


def test_fit_again_under_the_same_name_resumes_that_round_or_refuses_another(fit2, ray_local, train_path, storage):
    ids, cfg, fit, _, labeled = fit2
    assert "fingerprint" in json.loads((storage / "r0" / "round.json").read_text())
    again = fit_round(MODEL, cfg, labeled, None, seed=0, storage_dir=storage, name="r0", compute_grad_sum=False)
    assert again.resumed_from_epoch == 8 and again.epochs == 8 and again.grad_sum is None
    assert again.train_accuracy == fit.train_accuracy
    for k, v in fit.state_dict.items():
        assert torch.equal(again.state_dict[k], v)
    with pytest.raises(ValueError, match="different round"):
        fit_round(MODEL, cfg, labeled, None, seed=1, storage_dir=storage, name="r0")


def test_fit_batchnorm_model_uses_rank0_running_stats_for_g(ray_local, train_path, tmp_path):
    """Each DDP rank updates its own BN running stats; G must use the returned (rank 0) ones."""
    ids = seeded_ids(50_000, 66, seed=5)
    cfg = TrainConfig(max_epochs=1, train_accuracy=None, batch_size=32, num_workers=2)
    vgg = ModelConfig(name="vgg11", num_classes=10)
    fit = fit_round(vgg, cfg, prepare_labeled(str(train_path), ids), None, seed=0, storage_dir=tmp_path, name="bn")
    model = build_model("vgg11", 10)
    model.load_state_dict(fit.state_dict)
    assert fit.state_dict["features.1.num_batches_tracked"].item() == 3  # ceil(66 / 32) steps
    x, y = decode_rows(train_path, ids)
    assert_grad_close(fit.grad_sum, labeled_gradient(model, (x, y), "all"))


def test_fit_in_process_with_zero_workers(ray_local, train_path, tmp_path):
    ids = seeded_ids(50_000, 37, seed=3)
    cfg = TrainConfig(max_epochs=1, train_accuracy=None, batch_size=16, num_workers=0)
    threads = torch.get_num_threads()
    fit = fit_round(MODEL, cfg, prepare_labeled(str(train_path), ids), None, seed=0, storage_dir=tmp_path, name="local")
    assert fit.epochs == 1 and torch.get_num_threads() == threads
    x, y = decode_rows(train_path, ids)
    assert_grad_close(fit.grad_sum, labeled_gradient(trained_model(fit.state_dict), (x, y), "all"))
    assert not (tmp_path / "local" / "epoch_0001").exists()  # local mode keeps no checkpoints
    assert fit.workers == 0
    auto = fit_round(MODEL, dataclasses.replace(cfg, num_workers="auto"), prepare_labeled(str(train_path), ids), None,
                     seed=0, storage_dir=tmp_path, name="auto")  # no GPU here: "auto" trains in this process
    assert auto.workers == 0 and not (tmp_path / "auto").exists()
    assert all(torch.equal(auto.state_dict[k], v) for k, v in fit.state_dict.items())


def test_the_labeled_set_decoded_here_is_the_one_a_ray_data_pass_decodes(ray_local, train_path):
    ids = seeded_ids(50_000, 1500, seed=8)[::-1].copy()  # any order in, sorted out of the training loop
    people = np.random.default_rng(0).integers(0, 10, ids.size)
    for labels in (None, people):
        sets = [prepare_labeled(str(train_path), ids, labels=labels, here=here) for here in (False, True)]
        ray_rows, here_rows = (ds.to_pandas().sort_values("id").reset_index(drop=True) for ds in sets)
        assert ray_rows["id"].tolist() == here_rows["id"].tolist() == sorted(ids.tolist())
        assert ray_rows["label"].tolist() == here_rows["label"].tolist()
        assert np.array_equal(np.stack(ray_rows["x"]), np.stack(here_rows["x"]))
    assert here_rows["label"].tolist() == people[np.argsort(ids)].tolist()  # people's labels, not the pool's


def test_auto_workers_train_in_the_driver_without_a_gpu_and_on_one_gpu_worker_with_one(ray_local):
    assert train_workers(TrainConfig(num_workers="auto")) == 0  # this cluster has no GPU
    assert train_workers(TrainConfig(num_workers="auto", use_gpu=True)) == 1
    assert train_workers(TrainConfig(num_workers="auto", use_gpu=False)) == 0
    assert [train_workers(TrainConfig(num_workers=n, use_gpu=True)) for n in (0, 3)] == [0, 3]


def test_evaluate_is_exact(fit2, ray_local, cifar10_dir):
    path = cifar10_dir / "test.parquet"
    ids = seeded_ids(10_000, 500, seed=4)
    state = fit2[2].state_dict
    x, y = decode_rows(path, ids)
    with torch.no_grad():
        want = (trained_model(state).eval()(x).argmax(dim=1) == y).sum().item() / len(y)
    decoded = prepare_labeled(str(path), ids)
    warm = Actors(2, 0.5, 0, lifetime="run")  # the run's scorer actors, fed block slices
    assert evaluate(MODEL, state, decoded, batch_size=128, actors=warm) == want
    raw = read_pool(str(path), ids=ids)  # id, image, label: decoded inside the actors
    assert evaluate(MODEL, state, raw, batch_size=100) == want  # one actor for this pass (Ray Data's pool)
    assert evaluate(MODEL, state, raw, batch_size=100, actors=warm) == want


def test_bad_input_is_refused(ray_local, train_path, tmp_path):
    cfg = TrainConfig(num_workers=2)
    with pytest.raises(ValueError, match="duplicates"):
        prepare_labeled(str(train_path), np.array([3, 5, 3]))
    raw = read_pool(str(train_path), ids=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['x'\]"):
        fit_round(MODEL, cfg, raw, None, seed=0, storage_dir=tmp_path, name="bad")
    with pytest.raises(ValueError, match="fewer than train.num_workers"):
        fit_round(MODEL, cfg, prepare_labeled(str(train_path), np.array([7])), None, seed=0,
                  storage_dir=tmp_path, name="one")
    with pytest.raises(ValueError, match="init_state does not fit"):
        fit_round(MODEL, cfg, prepare_labeled(str(train_path), np.array([7, 8])), {"w": torch.zeros(1)}, seed=0,
                  storage_dir=tmp_path, name="bad_state")
    with pytest.raises(ValueError, match="scope must be one of"):
        fit_round(MODEL, cfg, raw, None, seed=0, storage_dir=tmp_path, name="bad", scope="first")
    with pytest.raises(ValueError, match="train.max_epochs"):
        fit_round(MODEL, TrainConfig(max_epochs=0), raw, None, seed=0, storage_dir=tmp_path, name="bad")
    with pytest.raises(ValueError, match="needs columns"):
        evaluate(MODEL, build_model("cnn", 10).state_dict(), raw.select_columns(["id", "label"]))


def test_a_failing_worker_raises_training_error_naming_the_round(ray_local, tmp_path):
    # One channel for a 3-channel model: the first forward fails (in-process, to keep the test fast;
    # with workers, Ray's WorkerGroupError is wrapped the same way).
    bad = ray.data.from_items([{"id": i, "x": np.zeros((1, 32, 32), np.float32), "label": 0} for i in range(6)])
    cfg = TrainConfig(max_epochs=1, train_accuracy=None, num_workers=0)
    with pytest.raises(TrainingError, match=r"(?s)round 'broken'.*channels"):
        fit_round(MODEL, cfg, bad.materialize(), None, seed=0, storage_dir=tmp_path, name="broken")


def test_shards_and_steps_cover_every_sample_once():
    ids = np.random.default_rng(0).choice(10**6, size=1001, replace=False)
    shards = deal_shards(ids, 4, seed=7)
    assert sorted(np.concatenate(shards).tolist()) == sorted(ids.tolist())
    assert {len(s) for s in shards} == {250, 251}
    assert all(np.array_equal(a, b) for a, b in zip(shards, deal_shards(ids[::-1], 4, seed=7)))
    steps, counts = step_plan([len(s) for s in shards], batch_size=128)
    assert steps == 8 and counts.sum() == 1001 and counts.max() - counts.min() <= 4
    steps, counts = step_plan([3, 2], batch_size=1)  # never more steps than the smallest shard has rows
    assert steps == 2 and counts.tolist() == [3, 2]
