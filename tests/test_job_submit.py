"""`ray job submit` against a real `ray start --head` on this machine runs jobs/cifar10.py to completion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import JOB_ARGS, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_runs_the_cifar10_job(cifar10_slice, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ray_temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # Ray's socket paths must stay under ~107 characters
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", str(free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats",
         # the session's embedded cluster already holds the agents' default ports (e.g. 52365)
         "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
         "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--ray-client-server-port", str(free_port()),
         "--temp-dir", ray_temp],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    out = tmp_path / "run"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 120
        while subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head node's job server did not come up in 2 minutes"
            time.sleep(1)
        submit = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                  "python", "jobs/cifar10.py", "--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS,
                  "--num-workers", "1"]
        deadline = time.monotonic() + 120
        while True:  # the job agent can come up a little after the job server answers `ray job list`
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in job.stdout + job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(ray_temp, ignore_errors=True)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert (out / "round_001" / "selected.parquet").exists()
