"""`ray job submit` against a real `ray start --head` on this machine runs jobs/cifar10.py to completion."""

from __future__ import annotations

import json
import os
import random
import re
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

# How a Ray process that lost a port race dies (GCS, raylet, agents, dashboard, ray client server).
PORT_IN_USE = re.compile(r"already in use|already occupied|failed to bind", re.IGNORECASE)


def unused_port() -> int:
    """A port nothing listens on, outside the kernel's ephemeral range (32768-60999: ports it gives outgoing
    connections, e.g. the session's own Ray's) and Ray's worker ports (10002-19999)."""
    while True:
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return port


def start_head(bin_dir: Path, env: dict, ray_temp: str, log: Path) -> subprocess.Popen:
    """`ray start --head --block`, its output in ``log``. Ray binds port 0 itself for the GCS, the dashboard and
    the agents (none of them can be taken first); only the ray client server needs a port number."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(bin_dir / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--port", "0",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", "0", "--dashboard-agent-listen-port", "0",
             "--ray-client-server-port", str(unused_port()), "--disable-usage-stats", "--temp-dir", ray_temp],
            env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
        )


def submit(bin_dir: Path, env: dict, head: subprocess.Popen, ray_temp: str, argv: list[str]):
    """Wait for the head's job server, then `ray job submit -- argv`: its CompletedProcess (None: the head exited)."""
    address_file = Path(ray_temp) / "ray_current_cluster"  # the GCS address, written once the head is up
    deadline = time.monotonic() + 120
    while not address_file.exists() or subprocess.run(
            [str(bin_dir / "ray"), "job", "list", "--address", address_file.read_text().strip()], env=env,
            capture_output=True).returncode != 0:
        if head.poll() is not None:
            return None
        assert time.monotonic() < deadline, "the head node's job server did not come up in 2 minutes"
        time.sleep(1)
    job_cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address_file.read_text().strip(), "--working-dir",
               str(REPO), "--", *argv]
    deadline = time.monotonic() + 120
    while True:  # the job agent can come up a little after the job server answers `ray job list`
        job = subprocess.run(job_cmd, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_runs_the_cifar10_job(cifar10_slice, tmp_path):
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    out = tmp_path / "run"
    argv = ["python", "jobs/cifar10.py", "--data-dir", str(cifar10_slice), "--out", str(out), *JOB_ARGS,
            "--num-workers", "1"]
    for attempt in (1, 2):  # a second head, once, when the first lost a port race
        log = tmp_path / f"ray_start_{attempt}.log"
        ray_temp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # Ray's socket paths must stay under ~107 characters
        head = start_head(bin_dir, env, ray_temp, log)
        try:
            job = submit(bin_dir, env, head, ray_temp, argv)
        finally:
            exited = head.poll()
            if exited is None:
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()
            shutil.rmtree(ray_temp, ignore_errors=True)
        started = log.read_text(errors="replace")
        if exited is None or attempt == 2 or not PORT_IN_USE.search(started):
            break
        shutil.rmtree(out, ignore_errors=True)  # the job may have begun on the lost head
    assert exited is None, f"ray start --head exited ({exited}) on attempt {attempt}:\n{started[-5000:]}"
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + "\nray start:\n" + started[-2000:]
    assert "succeeded" in job.stdout
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [0, 1, 2]
    assert (out / "round_001" / "selected.parquet").exists()
