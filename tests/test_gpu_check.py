"""benchmarks/gpu_check.sh where there is no GPU, and the exactness tests' device switch (RAY_DAL_TEST_*)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_scoring_exact import Target

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
RESULTS = REPO / "benchmarks" / "results" / "gpu"


def gpu_machine() -> bool:
    return bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg") or shutil.which("nvidia-smi") is not None


def listing(folder: Path) -> dict[str, bytes] | None:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} \
        if folder.exists() else None


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(gpu_machine(), reason="a GPU machine: run benchmarks/gpu_check.sh itself")
def test_without_a_gpu_it_stops_at_once_and_writes_nothing(tmp_path):
    out, tmp = tmp_path / "gpu", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    (out / "environment.txt").write_text("a previous run's results\n")  # a failed check must not replace them
    (out / "summary.md").write_text("| pool_1m | ok | 9000/s |\n")
    before, committed = listing(out), listing(RESULTS)
    env = {**os.environ, "RAY_DAL_GPU_CHECK_OUT": str(out), "TMPDIR": str(tmp)}
    t0 = time.perf_counter()
    done = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - t0
    assert done.returncode == 2, done.stdout + done.stderr
    assert seconds < 30
    assert "FAILED: no CUDA GPU is visible" in done.stderr
    assert "Nothing was run and nothing was written" in done.stderr
    for what in ("tests/test_scoring_exact.py", "float32", "bf16", "scoring_cost.py", "resnet18", "ray-dal select",
                 "1000000-sample synthetic pool", str(out)):
        assert what in done.stderr, f"the message does not say what the script would have run: {what!r}"
    assert listing(out) == before
    assert listing(tmp) == {} and listing(RESULTS) == committed


def test_device_switch_reads_the_environment():
    assert Target.from_env({}) == Target()  # no variable: the tests run exactly as written, on the CPU in float64
    cuda32 = Target.from_env({"RAY_DAL_TEST_DEVICE": "cuda"})
    assert (cuda32.moved, cuda32.device, cuda32.dtype, cuda32.autocast) == (True, "cuda", torch.float32, False)
    bf16 = Target.from_env({"RAY_DAL_TEST_DEVICE": "cuda:1", "RAY_DAL_TEST_AUTOCAST": "bf16"})
    assert (bf16.device, bf16.dtype, bf16.autocast, bf16.rtol(1e-8)) == ("cuda:1", torch.float32, True, 1e-1)
    assert Target.from_env({"RAY_DAL_TEST_DTYPE": "float64"}).rtol(1e-8) == 1e-8  # float64 anywhere: as written
    assert cuda32.rtol(1e-8, "ghost") == 1e-4 and cuda32.rtol(1e-8, "materialize") == 1e-2
    for env, message in [({"RAY_DAL_TEST_DTYPE": "float16"}, "RAY_DAL_TEST_DTYPE must be float32 or float64"),
                         ({"RAY_DAL_TEST_AUTOCAST": "fp16"}, "RAY_DAL_TEST_AUTOCAST must be bf16"),
                         ({"RAY_DAL_TEST_AUTOCAST": "bf16", "RAY_DAL_TEST_DTYPE": "float64"}, "float32 weights")]:
        with pytest.raises(ValueError, match=message):
            Target.from_env(env)


def exactness(env: dict[str, str], select: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_scoring_exact.py", "-k", select],
        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_moved_exactness_tests_run_and_pass_on_the_cpu():
    """The moved path (a float32 copy under bf16 autocast, results back as float64) end to end, on the CPU."""
    done = exactness({"RAY_DAL_TEST_DEVICE": "cpu", "RAY_DAL_TEST_AUTOCAST": "bf16"},
                     "every_gamma and cnn-last or labeled_gradient and cnn-last or bad_arguments")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 passed, 1 skipped" in done.stdout, done.stdout[-3000:]  # bad arguments: device-independent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_cuda_exactness_tests_fail_clearly_without_a_gpu():
    done = exactness({"RAY_DAL_TEST_DEVICE": "cuda"}, "every_gamma and cnn-last")
    assert done.returncode != 0
    assert "RAY_DAL_TEST_DEVICE=cuda, but torch sees no CUDA GPU" in done.stdout, done.stdout[-3000:]
