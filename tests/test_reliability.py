"""Reliability: a query does not depend on how many scorers ran or which of them died, and a killed run
resumes from its last complete round, whatever it was doing when killed.

Covered elsewhere, not repeated here: a Ray Train worker SIGKILLed mid-round resumes from its epoch
checkpoint (tests/test_training.py::test_fit_two_workers_survives_a_killed_worker_and_counts_every_sample_once),
a whole job SIGKILLed during round 1 resumes to the same files
(tests/test_pipeline.py::test_killed_run_resumes_to_the_same_files), and the random strategy's query
across actor counts (tests/test_pool_scoring.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from ray._private import state as ray_state

from ray_dal.config import ExperimentConfig, ModelConfig
from ray_dal.data import preprocess_batch
from ray_dal.models import build_model
from ray_dal.pipeline.pool_scoring import PoolQuery, score_pool
from ray_dal.loop.run_dir import RunDir
from ray_dal.scoring import labeled_gradient

from . import node_loss
from .conftest import JOB_ARGS, REPO, assert_same_run, run_job
from .faults import (
    ROUND_WRITER,
    KillMidScoring,
    descendants,
    is_busy,
    is_scorer,
    kill_job_when,
    local_scorers,
)


@dataclasses.dataclass
class Weights:
    state_dict: dict[str, torch.Tensor]
    grad_sum: dict[str, torch.Tensor]
    labeled: np.ndarray  # ids of the pool G was summed over: excluded from the query


@pytest.fixture(scope="module")
def pool(cifar10_slice) -> Path:
    return cifar10_slice / "train.parquet"  # 2,000 real images, 4 row groups


@pytest.fixture(scope="module")
def weights(pool) -> Weights:
    """A seeded cnn and G over 200 real labeled images of the pool."""
    table = pq.read_table(pool)
    ids = table["id"].to_numpy()
    rows = np.sort(np.random.default_rng(5).choice(len(ids), 200, replace=False))
    part = table.take(rows)
    batch = preprocess_batch({"id": ids[rows], "image": np.array(part["image"].to_pylist(), dtype=object),
                              "label": part["label"].to_numpy()})
    torch.manual_seed(0)
    model = build_model("cnn", 10)
    grad_sum = labeled_gradient(model, (torch.from_numpy(batch["x"]), torch.from_numpy(batch["label"])))
    return Weights(model.state_dict(), grad_sum, ids[rows])


def query(pool: Path, w: Weights, num_scorers: int, lifetime: str = "run") -> PoolQuery:
    cfg = dataclasses.replace(node_loss.SCORING, num_scorers=num_scorers, scorer_lifetime=lifetime)
    return score_pool(str(pool), model_cfg=ModelConfig(), state_dict=w.state_dict, grad_sum=w.grad_sum,
                      scoring_cfg=cfg, budget=node_loss.BUDGET, exclude_ids=w.labeled, seed=0)


def assert_same_query(ids: np.ndarray, scores: np.ndarray, num_scored: int, ref: PoolQuery) -> None:
    np.testing.assert_array_equal(ids, ref.ids)
    np.testing.assert_allclose(scores, ref.scores, rtol=1e-6)  # float32 scores: equal to float precision
    assert num_scored == ref.num_scored  # every sample scored once: a retried batch is not counted twice


@pytest.fixture(scope="module")
def reference(ray_local, pool, weights) -> PoolQuery:
    """The dynamic query of one scorer, no faults."""
    return query(pool, weights, num_scorers=1)


# ---- determinism -----------------------------------------------------------------------------------------


def test_dynamic_query_is_the_same_with_one_or_two_scorers_warm_or_per_pass(ray_local, pool, weights, reference):
    assert reference.num_scored == 2000 - len(weights.labeled)
    for lifetime in ("run", "pass"):
        two = query(pool, weights, num_scorers=2, lifetime=lifetime)
        assert_same_query(two.ids, two.scores, two.num_scored, reference)


# ---- actor and node faults -------------------------------------------------------------------------------


def actor_id_of(pid: int) -> str:
    """The Ray actor living in process ``pid`` (from the GCS actor table)."""
    return next(a["ActorID"] for a in ray_state.actors().values() if a["Pid"] == pid)


@pytest.mark.parametrize("lifetime", ["run", "pass"])
def test_a_scorer_killed_mid_batch_is_replaced_and_the_query_is_unchanged(ray_local, pool, weights, reference,
                                                                          lifetime):
    victim = {}

    def kill(pid: int, _) -> None:
        victim["actor"] = actor_id_of(pid)
        os.kill(pid, signal.SIGKILL)

    with KillMidScoring(local_scorers, kill) as fault:
        q = query(pool, weights, num_scorers=2, lifetime=lifetime)
    assert fault.killed is not None, "no scorer was caught between two batches: nothing was killed"
    assert ray_state.actors(victim["actor"])["NumRestarts"] >= 1  # Ray restarted that very actor
    assert_same_query(q.ids, q.scores, q.num_scored, reference)


@pytest.mark.slow
def test_losing_a_node_during_scoring_gives_the_same_query(ray_local, pool, weights, reference, tmp_path):
    saved = tmp_path / "weights.pt"
    torch.save({"state_dict": weights.state_dict, "grad_sum": weights.grad_sum,
                "exclude_ids": torch.from_numpy(weights.labeled)}, saved)
    out = tmp_path / "query.npz"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tests.node_loss", str(pool), str(saved), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.load(out)
    assert got["node_lost"], "no scorer on a worker node was caught between two batches: no node was lost"
    assert got["restarts"].max() >= 1  # the lost node's scorer was restarted on a live node
    assert_same_query(got["ids"], got["scores"], int(got["num_scored"]), reference)


# ---- preemption: a killed run resumes from its last complete round --------------------------------------


def test_a_kill_while_a_round_is_written_leaves_only_complete_rounds(tmp_path):
    out = tmp_path / "run"
    partial = out / ".round_001.partial"
    kill_job_when([sys.executable, "-c", ROUND_WRITER, str(out), str(2**27)],  # a 512 MB model.pt
                  lambda pid: (partial / "model.pt").exists(), "round 1's write began")
    run = RunDir(out)
    assert partial.is_dir() and not run.round_path(1).exists()  # killed mid-write: only the partial folder
    assert run.completed_rounds() == [0]
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0]
    run.start(ExperimentConfig())  # what a resumed run does first
    assert not partial.exists() and run.completed_rounds() == [0]
    assert torch.equal(run.load(0).state_dict["w"], torch.ones(1))


def scoring_after_round_0(out: Path):
    """A condition on the job's pid: round 0 is complete and a scorer actor runs a batch (round 1 is being scored:
    round 0's passes end before its folder is committed)."""

    def condition(job: int) -> bool:
        return (out / "round_000").exists() and any(is_scorer(p) and is_busy(p) for p in descendants(job))

    return condition


@pytest.mark.slow
def test_a_run_killed_while_scoring_resumes_past_a_half_written_round(finished_run, cifar10_slice, tmp_path):
    out = tmp_path / "killed"
    argv = ["--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS]
    kill_job_when([sys.executable, str(REPO / "jobs" / "cifar10.py"), *argv, "--num-cpus", "2"],
                  scoring_after_round_0(out), "round 1's scoring began")
    assert RunDir(out).completed_rounds() == [0]
    # What a kill during round 1's write leaves beside it (test above): a partial folder with a truncated
    # model and a metrics.json, and an unfinished temp file of metrics.jsonl.
    partial = out / ".round_001.partial"
    shutil.copytree(finished_run / "round_001", partial)
    model = (partial / "model.pt").read_bytes()
    (partial / "model.pt").write_bytes(model[: len(model) // 2])
    (out / ".metrics.jsonl.tmp").write_text('{"round": 0}\n{"round": 1, "n_la')

    run_job([*argv, "--num-scorers", "2"])  # resumed with another number of scorers: the same run
    assert_same_run(out, finished_run)


def test_a_metrics_file_cut_short_is_rebuilt_on_resume(finished_run, cifar10_slice, tmp_path):
    out = tmp_path / "moved"  # a run folder can be moved: its location is not part of its identity
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("ray_train"))
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:-1]))  # killed between the last rename and the rebuild
    rounds = {p: p.stat().st_mtime_ns for p in out.rglob("round_*/*")}
    run_job(["--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS])  # every round done: nothing to run
    assert (out / "metrics.jsonl").read_text() == "".join(lines)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("round_*/*")} == rounds
