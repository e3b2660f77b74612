"""The AL pipeline end to end on real CIFAR-10 slices: jobs/cifar10.py, run layout, select, resume after a kill."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ray_dal.cli import main as ray_dal_main
from ray_dal.models import build_model

from .conftest import JOB_ARGS, REPO

ROUNDS, INITIAL, BUDGET = 2, 200, 100


def run_job(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location("cifar10_job", REPO / "jobs" / "cifar10.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job.main(argv)


@pytest.fixture(scope="module")
def data_dir(cifar10_slice) -> Path:
    return cifar10_slice


@pytest.fixture(scope="module")
def finished_run(ray_local, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_job(["--data-dir", str(data_dir), "--out", str(out), *JOB_ARGS])
    return out


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
    assert mine.column_names == ["id", "score", "rank"]
    assert np.array_equal(mine["id"].to_numpy(), runs["id"].to_numpy())
    np.testing.assert_allclose(mine["score"].to_numpy(), runs["score"].to_numpy(), rtol=1e-4)


def test_killed_run_resumes_to_the_same_files(finished_run, data_dir, tmp_path):
    out = tmp_path / "killed"
    argv = [sys.executable, str(REPO / "jobs" / "cifar10.py"), "--data-dir", str(data_dir), "--out", str(out),
            *JOB_ARGS, "--num-cpus", "2"]
    job = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (out / "round_000").exists():
            assert job.poll() is None, "the job ended before completing round 0"
            assert time.monotonic() < deadline, "round 0 did not complete within 10 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-way through round 1
        job.wait()
    assert not (out / f"round_{ROUNDS:03d}").exists(), "the kill came too late to test a resume"

    run_job(["--data-dir", str(data_dir), "--out", str(out), *JOB_ARGS])

    for r in range(ROUNDS + 1):
        mine, ref = out / f"round_{r:03d}", finished_run / f"round_{r:03d}"
        assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in ref.iterdir())
        assert pq.read_table(mine / "labeled.parquet").equals(pq.read_table(ref / "labeled.parquet"))
        a, b = (torch.load(f / "model.pt", weights_only=True) for f in (mine, ref))
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
        if r < ROUNDS:
            x, y = pq.read_table(mine / "selected.parquet"), pq.read_table(ref / "selected.parquet")
            assert np.array_equal(x["id"].to_numpy(), y["id"].to_numpy())
            np.testing.assert_allclose(x["score"].to_numpy(), y["score"].to_numpy(), rtol=1e-5)
    assert not list(out.glob(".round_*.partial"))
    keys = ("round", "n_labeled", "test_accuracy", "pool_size")
    lines = [[{k: json.loads(s)[k] for k in keys} for s in (f / "metrics.jsonl").read_text().splitlines()]
             for f in (out, finished_run)]
    assert lines[0] == lines[1]
