"""The AL pipeline end to end on real CIFAR-10 slices: jobs/cifar10.py, run layout, select, resume after a kill."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ray_dal.cli import main as ray_dal_main
from ray_dal.models import build_model

from .conftest import JOB_ARGS, REPO, assert_same_run, run_job
from .faults import kill_job_when

ROUNDS, INITIAL, BUDGET = 2, 200, 100


@pytest.fixture(scope="module")
def data_dir(cifar10_slice) -> Path:
    return cifar10_slice


def read_ids(path: Path) -> np.ndarray:
    return pq.read_table(path)["id"].to_numpy()


def test_run_directory_layout_and_queries(finished_run, data_dir):
    pool_ids = read_ids(data_dir / "train.parquet")
    pool_labels = dict(zip(pool_ids.tolist(), pq.read_table(data_dir / "train.parquet")["label"].to_pylist()))
    config = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert config["loop"]["budget"] == BUDGET and config["data"]["data_dir"] == str(data_dir)
    metrics = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(ROUNDS + 1))
    for r, m in enumerate(metrics):
        folder = finished_run / f"round_{r:03d}"
        labeled = pq.read_table(folder / "labeled.parquet")
        ids = labeled["id"].to_numpy()
        assert m["n_labeled"] == len(ids) == INITIAL + r * BUDGET == len(np.unique(ids))
        assert np.isin(ids, pool_ids).all()
        assert labeled["label"].to_pylist() == [pool_labels[i] for i in ids.tolist()]  # the oracle's labels
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["train_seconds"] > 0
        assert m["pool_size"] == len(pool_ids) - len(ids)
        assert m["train_workers"] == 2  # JOB_ARGS: --num-workers 2 (Ray Train)
        parts = ["prepare", "train_startup", "train", "grad", "eval", "score", "approximation"]
        seconds = [m.get(f"{p}_seconds") or 0.0 for p in parts]
        assert min(seconds[:4]) > 0 and sum(seconds) < m["round_seconds"], dict(zip(parts, seconds))
        # a round that queries tests its model in the scoring pass (one actor pool); the last one on its own
        assert (m["eval_seconds"] is None) == (r < ROUNDS) and (m["score_seconds"] is None) == (r == ROUNDS)
        model = build_model("cnn", 10)
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        if r < ROUNDS:
            selected = pq.read_table(folder / "selected.parquet")
            sel = selected["id"].to_numpy()
            assert len(sel) == BUDGET == len(np.unique(sel))
            assert not np.isin(sel, ids).any() and np.isin(sel, pool_ids).all()
            assert selected["rank"].to_pylist() == list(range(BUDGET))
            assert np.all(np.diff(selected["score"].to_numpy()) <= 0)
            assert m["samples_per_second"] > 0 and m["score_seconds"] > 0
            next_ids = read_ids(finished_run / f"round_{r + 1:03d}" / "labeled.parquet")
            assert np.array_equal(next_ids, np.union1d(ids, sel))
        else:
            assert not (folder / "selected.parquet").exists() and m["score_seconds"] is None


def test_rerunning_a_finished_run_changes_nothing(finished_run, data_dir):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("round_*/*")}
    run_job(["--data-dir", str(data_dir), "--out", str(finished_run), *JOB_ARGS])
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("round_*/*")} == before


def test_resuming_with_a_different_configuration_is_refused(finished_run, data_dir):
    from ray_dal.config import ConfigError

    with pytest.raises(ConfigError, match="loop.budget: 100 before, 50 now"):
        run_job(["--data-dir", str(data_dir), "--out", str(finished_run), *JOB_ARGS, "--budget", "50"])


def test_select_command_reproduces_the_runs_query(finished_run, data_dir, tmp_path):
    round0 = finished_run / "round_000"
    out = tmp_path / "query.parquet"
    ray_dal_main(["select", "--pool", str(data_dir / "train.parquet"), "--checkpoint", str(round0 / "model.pt"),
                  "--labeled", str(round0 / "labeled.parquet"), "--budget", str(BUDGET), "--out", str(out),
                  "--num-scorers", "1", "--image-size", "32", "32"])
    mine, runs = pq.read_table(out), pq.read_table(round0 / "selected.parquet")
    assert mine.column_names == ["id", "score", "rank", "pred", "prob"]
    assert np.array_equal(mine["pred"].to_numpy(), runs["pred"].to_numpy())
    assert np.array_equal(mine["id"].to_numpy(), runs["id"].to_numpy())
    np.testing.assert_allclose(mine["score"].to_numpy(), runs["score"].to_numpy(), rtol=1e-4)


def test_killed_run_resumes_to_the_same_files(finished_run, data_dir, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, str(REPO / "jobs" / "cifar10.py"), "--data-dir", str(data_dir), "--out", str(out),
            *JOB_ARGS, "--num-cpus", "2"]
    # The driver and its embedded Ray, killed mid-way through round 1.
    kill_job_when(argv, lambda pid: (out / "round_000").exists(), "round 0 was complete")
    assert not (out / f"round_{ROUNDS:03d}").exists(), "the kill came too late to test a resume"

    run_job(["--data-dir", str(data_dir), "--out", str(out), *JOB_ARGS])
    assert_same_run(out, finished_run)
