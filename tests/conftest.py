"""Shared fixtures: one real local Ray cluster per test session, and the real CIFAR-10 Parquet files."""

from __future__ import annotations

from pathlib import Path

import pytest

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

    from ray_dal.runtime import init_ray

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
