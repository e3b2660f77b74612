"""A real S3 API server for the tests: moto in server mode (``moto_server``, from the test extras).

`s3` (session fixture) starts it on a free 127.0.0.1 port and points this process's environment at it
(``AWS_ENDPOINT_URL``; the test credentials and ``AWS_REGION`` are set on import), so `ray_dal.storage.location("s3://...")`
reaches it the way a user's shell would reach MinIO or AWS; processes the tests start inherit it. The
server keeps objects in memory: a restart (`S3Server.restart`, same port) empties it. `bucket` gives
each test a fresh bucket. Output goes to ``moto.log`` in a temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from .label_studio_server import free_port

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
START_TIMEOUT_S = 60.0
ENV = {"AWS_ACCESS_KEY_ID": "ray-dal-test-key", "AWS_SECRET_ACCESS_KEY": "ray-dal-test-secret-do-not-print",
       "AWS_REGION": "us-east-1"}
# Set when the tests are collected, before any Ray cluster starts: Ray workers inherit the environment of the
# process that started Ray, and read credentials from it as a user's nodes would (the endpoint travels with
# each `Location`). Without them a worker's requests go unsigned, and moto refuses unsigned uploads.
os.environ.update(ENV)


@dataclass
class S3Server:
    endpoint: str
    port: int
    log: Path
    process: subprocess.Popen | None = None
    startup_seconds: float = 0.0

    def start(self) -> None:
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        fs = self.filesystem()
        while True:
            try:
                fs.get_file_info(pafs.FileSelector("", allow_not_found=True))
                break
            except OSError:
                assert self.process.poll() is None, f"moto_server exited at start; see {self.log}"
                assert time.monotonic() - started < START_TIMEOUT_S, f"moto_server not up in {START_TIMEOUT_S} s"
                time.sleep(0.2)
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (moto forgets every bucket)."""
        self.stop()
        self.start()

    def filesystem(self) -> pafs.S3FileSystem:
        """A filesystem on this server that may create and delete buckets (for setting tests up)."""
        retry = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        return pafs.S3FileSystem(endpoint_override=self.endpoint, region=ENV["AWS_REGION"], retry_strategy=retry,
                                 allow_bucket_creation=True, allow_bucket_deletion=True)

    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"b-{uuid.uuid4().hex[:12]}"
        self.filesystem().create_dir(name)
        return name

    def upload(self, local: Path, uri: str) -> None:
        """Copy a local file or folder to ``s3://bucket/key`` (a folder: its files, recursively)."""
        fs, prefix = self.filesystem(), uri.removeprefix("s3://").rstrip("/")
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for f in files:
            key = prefix if local.is_file() else f"{prefix}/{f.relative_to(local).as_posix()}"
            with fs.open_output_stream(key) as out, open(f, "rb") as src:
                shutil.copyfileobj(src, out)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A running moto S3 server; this process's AWS_* environment points at it for the session."""
    port = free_port()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", port=port,
                      log=tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in [*ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(ENV, AWS_ENDPOINT_URL=server.endpoint)  # ENV again: a test may have changed it
    server.start()
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket on the session's S3 server (its name)."""
    return s3.create_bucket()
