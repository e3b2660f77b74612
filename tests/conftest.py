"""Shared fixtures: one real local Ray cluster per test session, and the real CIFAR-10 Parquet files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .label_studio_server import label_studio  # noqa: F401  (session fixture: a real Label Studio server)
from .s3_server import bucket, s3  # noqa: F401  (a real S3 API server: moto, and a fresh bucket per test)
from .slices import write_slice

REPO = Path(__file__).resolve().parents[1]
CIFAR10_DIR = REPO.parent / "shared" / "data" / "cifar10"
# A small experiment on `cifar10_slice`: 200 initial labels, 2 rounds of 100, 2 epochs per round.
JOB_ARGS = ["--initial", "200", "--budget", "100", "--rounds", "2", "--epochs", "2",
            "--num-workers", "2", "--num-scorers", "1", "--seed", "3"]


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """../shared/data/cifar10 (train.parquet, test.parquet). Missing data fails loudly, never skips."""
    if not (CIFAR10_DIR / "train.parquet").is_file():
        pytest.fail(f"real CIFAR-10 Parquet files are expected at {CIFAR10_DIR} (the shared/ folder beside the repo)")
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray cluster with 2 CPUs, shared by all tests; Ray Data fails after 60 s without progress."""
    import ray

    from ray_dal.pipeline.runtime import init_ray

    init_ray(num_cpus=2, no_progress_timeout_s=60)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cifar10_slice(tmp_path_factory, cifar10_dir) -> Path:
    """Seeded slices of the real CIFAR-10 files (2,000 train / 300 test rows, original row ids in ``id``)."""
    folder = tmp_path_factory.mktemp("cifar10_slice")
    write_slice(cifar10_dir / "train.parquet", folder / "train.parquet", 2000, seed=1)
    write_slice(cifar10_dir / "test.parquet", folder / "test.parquet", 300, seed=2)
    return folder


def run_job(argv: list[str], job: str = "cifar10") -> None:
    """jobs/<job>.py's main(argv), in this process (its errors arrive as exceptions, not exit codes)."""
    spec = importlib.util.spec_from_file_location(f"{job}_job", REPO / "jobs" / f"{job}.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    job.main(argv)


@pytest.fixture(scope="session")
def finished_run(ray_local, cifar10_slice, tmp_path_factory) -> Path:
    """An uninterrupted run of JOB_ARGS on `cifar10_slice` (3 rounds). Read it, never write to it: copy it."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    run_job(["--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS])
    return out


def assert_same_run(out: Path, ref: Path) -> None:
    """``out`` holds the rounds of ``ref``: same files, labeled sets, queries, models (to float precision), metrics."""
    import json

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    rounds = sorted(p.name for p in ref.glob("round_*"))
    assert sorted(p.name for p in out.glob("round_*")) == rounds
    for name in rounds:
        mine, theirs = out / name, ref / name
        assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in theirs.iterdir())
        assert pq.read_table(mine / "labeled.parquet").equals(pq.read_table(theirs / "labeled.parquet"))
        a, b = (torch.load(f / "model.pt", weights_only=True) for f in (mine, theirs))
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
        if (theirs / "selected.parquet").exists():
            x, y = pq.read_table(mine / "selected.parquet"), pq.read_table(theirs / "selected.parquet")
            assert np.array_equal(x["id"].to_numpy(), y["id"].to_numpy())
            np.testing.assert_allclose(x["score"].to_numpy(), y["score"].to_numpy(), rtol=1e-5)
    assert not list(out.glob(".round_*.partial")) and not list(out.glob(".*.tmp"))
    keys = ("round", "n_labeled", "test_accuracy", "pool_size", "skipped_ids")
    lines = [[{k: json.loads(s)[k] for k in keys} for s in (f / "metrics.jsonl").read_text().splitlines()]
             for f in (out, ref)]
    assert lines[0] == lines[1]
