"""Run directories in object storage, against a real S3 API server (moto) and real CIFAR-10 slices.

A run in a bucket computes what the same run on disk computes; a round there is visible only once its
manifest is written (last), so a kill at any point resumes to the same files; one process at a time works
on a run (its lease); ``ray-dal round`` and ``ray-dal export`` take URIs; no secret reaches the run's
files or its log.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from ray_dal.cli import main as ray_dal_main
from ray_dal.config import ExperimentConfig
from ray_dal.loop.run_dir import MANIFEST, RunDir
from ray_dal.storage import RunBusyError, RunLease, location

from .conftest import JOB_ARGS, REPO, assert_same_run, run_job
from .faults import ROUND_WRITER, kill_job_when
from .s3_server import ENV
from .test_round import ROUND_ARGS, assert_same_round

SECRET = ENV["AWS_SECRET_ACCESS_KEY"].encode()
ROUND_FILES = ["_COMMITTED.json", "labeled.parquet", "metrics.json", "model.pt", "selected.parquet"]


@pytest.fixture(scope="module")
def s3_data(s3, cifar10_slice) -> str:
    """`cifar10_slice` (train.parquet, test.parquet) in a bucket of its own."""
    uri = f"s3://{s3.create_bucket()}/cifar10"
    s3.upload(cifar10_slice, uri)
    return uri


@pytest.fixture
def log_dir(tmp_path, monkeypatch) -> Path:
    """Where the logs of runs in object storage go during the test (`RunDir.log_file`)."""
    monkeypatch.setenv("RAY_DAL_LOG_DIR", str(tmp_path / "logs"))
    return tmp_path / "logs"


def objects(uri: str) -> dict[str, bytes]:
    """Every object under ``uri``, by key relative to it."""
    root = location(uri)
    infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=True, allow_not_found=True))
    return {i.path[len(root.path) + 1:]: location(f"s3://{i.path}").read_bytes()
            for i in infos if i.type == pafs.FileType.File}


def download(uri: str, dest: Path) -> Path:
    """A local copy of the run at ``uri`` (what `assert_same_run` compares)."""
    for key, data in objects(uri).items():
        (dest / key).parent.mkdir(parents=True, exist_ok=True)
        (dest / key).write_bytes(data)
    return dest


def assert_no_secret(uri: str, *local_files: Path) -> None:
    for key, data in objects(uri).items():
        assert SECRET not in data, f"{uri}/{key} holds AWS_SECRET_ACCESS_KEY"
    for f in local_files:
        assert f.is_file() and SECRET not in f.read_bytes(), f


def a_round(run: RunDir, index: int, size: int = 1) -> None:
    ids = np.arange(10 + index)
    run.write_round(index, ids, ids % 10, {"w": torch.ones(size)}, {"round": index},
                    {"id": ids[:2], "score": np.ones(2)})


# ---- the commit protocol --------------------------------------------------------------------------------


def test_a_round_in_a_bucket_counts_only_with_its_manifest_and_matching_sizes(bucket):
    uri = f"s3://{bucket}/run"
    run = RunDir(uri)
    run.start(ExperimentConfig())
    a_round(run, 0)
    a_round(run, 1)
    keys = objects(uri)
    assert sorted(k for k in keys if k.startswith("round_000/")) == [f"round_000/{f}" for f in ROUND_FILES]
    manifest = json.loads(keys[f"round_000/{MANIFEST}"])
    assert manifest == {"round": 0, "files": {f: len(keys[f"round_000/{f}"]) for f in ROUND_FILES[1:]}}
    assert run.completed_rounds() == [0, 1] and len(keys["metrics.jsonl"].splitlines()) == 2
    with pytest.raises(FileExistsError, match="round_001 is already complete"):
        a_round(run, 1)

    model = location(f"{uri}/round_001/model.pt")
    model.write_bytes(model.read_bytes()[:100])  # an object that is not the one the manifest counted
    assert run.completed_rounds() == [0] and run.metrics() == [{"round": 0}]
    location(f"{uri}/round_002/labeled.parquet").write_bytes(keys["round_000/labeled.parquet"])  # no manifest
    assert run.completed_rounds() == [0]
    run.start(ExperimentConfig())  # what a resumed run does first: incomplete rounds go, to be redone
    assert sorted({k.split("/")[0] for k in objects(uri)}) == ["config.yaml", "metrics.jsonl", "round_000"]
    a_round(run, 1)
    assert run.completed_rounds() == [0, 1] and np.array_equal(run.load(1).selected_ids, [0, 1])




def test_a_kill_while_a_round_is_uploaded_leaves_only_complete_rounds(bucket):
    uri = f"s3://{bucket}/run"
    started = location(f"{uri}/round_001/labeled.parquet")
    kill_job_when([sys.executable, "-c", ROUND_WRITER, uri, str(2**25)],  # a 128 MB model.pt to upload
                  lambda pid: started.exists(), "round 1's upload began")
    run = RunDir(uri)
    assert started.exists() and not location(f"{uri}/round_001/{MANIFEST}").exists()
    assert run.completed_rounds() == [0] and [json.loads(x)["round"] for x in
                                              location(f"{uri}/metrics.jsonl").read_text().splitlines()] == [0]
    run.start(ExperimentConfig())
    assert not location(f"{uri}/round_001").exists() and run.completed_rounds() == [0]
    assert torch.equal(run.load(0).state_dict["w"], torch.ones(1))


# ---- whole runs -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_with_data_and_run_in_a_bucket_computes_the_run_on_disk(s3, s3_data, finished_run, bucket, log_dir,
                                                                        tmp_path, capsys):
    uri = f"s3://{bucket}/runs/cifar10"
    run_job(["--data-dir", s3_data, "--out", uri, *JOB_ARGS])
    out, err = capsys.readouterr()
    log_file = log_dir / "s3" / bucket / "runs" / "cifar10" / "ray.log"
    assert f"results in {uri}" in out and f"is the local file {log_file}" in err
    assert_same_run(download(uri, tmp_path / "copy"), finished_run)
    config = yaml.safe_load(location(f"{uri}/config.yaml").read_text())
    assert config["data"]["data_dir"] == s3_data and config["loop"]["out"] == uri
    assert not location(f"{uri}/lease.json").exists()  # released
    assert location(f"{uri}/ray_train/round_000/round.json").is_file()  # Ray Train's storage: the same bucket
    assert_no_secret(uri, log_file)


@pytest.mark.slow
def test_a_run_in_a_bucket_killed_mid_training_resumes_to_the_same_files(s3, s3_data, finished_run, bucket,
                                                                          log_dir, tmp_path):
    uri = f"s3://{bucket}/killed"
    config = yaml.safe_load((REPO / "configs" / "cifar10.yaml").read_text())
    config["train"]["checkpoint_every_s"] = 0  # a checkpoint after every epoch (not part of the run's identity)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    argv = ["--config", str(tmp_path / "c.yaml"), "--data-dir", s3_data, "--out", uri, *JOB_ARGS]
    snapshot = location(f"{uri}/ray_train/round_001/checkpoint_manager_snapshot.json")  # Ray Train's list

    def first_checkpoint_listed(pid: int) -> bool:  # round 1's first epoch (of 2) is checkpointed in the bucket
        return snapshot.exists() and "epoch_0001" in snapshot.read_text()

    kill_job_when([sys.executable, str(REPO / "jobs" / "cifar10.py"), *argv, "--num-cpus", "2"],
                  first_checkpoint_listed, "round 1's first checkpoint")
    run = RunDir(uri)
    assert run.completed_rounds() == [0], "the kill came too late to test a resume"
    checkpoint = location(f"{uri}/ray_train/round_001/epoch_0001/model.pt")
    written = checkpoint.info().mtime
    lease = json.loads(location(f"{uri}/lease.json").read_text())  # left by the killed process
    assert lease["host"] == socket.gethostname()
    # What a kill while round 1 was uploaded leaves: some of its objects, no manifest.
    for name in ("labeled.parquet", "metrics.json"):
        location(f"{uri}/round_001/{name}").write_bytes((finished_run / "round_001" / name).read_bytes())
    location(f"{uri}/round_001/model.pt").write_bytes((finished_run / "round_001" / "model.pt").read_bytes()[:999])

    run_job(argv)  # the same command, at once: the dead holder's lease is taken over
    assert_same_run(download(uri, tmp_path / "copy"), finished_run)
    assert checkpoint.info().mtime == written  # round 1 went on from its epoch 1 checkpoint, not from scratch
    assert_no_secret(uri, log_dir / "s3" / bucket / "killed" / "ray.log")


# ---- one process per run --------------------------------------------------------------------------------

HOLDER = """
import sys, time
from ray_dal.storage import RunLease
lease = RunLease(sys.argv[1])
lease.acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_a_second_process_on_a_live_run_is_refused_and_a_killed_one_is_taken_over_at_once(
        store, cifar10_slice, tmp_path, log_dir, capsys, request):
    run = str(tmp_path / "run") if store == "disk" else f"s3://{request.getfixturevalue('bucket')}/run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = rf"{run} is in use by process {holder.pid} on {socket.gethostname()} \(since .*Fix: wait"
        with pytest.raises(RunBusyError, match=busy):
            run_job(["--data-dir", str(cifar10_slice), "--out", run, *JOB_ARGS])
        labels = tmp_path / "labels.csv"
        pacsv.write_csv(pq.read_table(cifar10_slice / "train.parquet", columns=["id", "label"]).slice(0, 20), labels)
        with pytest.raises(SystemExit) as exit_info:
            ray_dal_main(["round", "--pool", str(cifar10_slice / "train.parquet"), "--labels", str(labels),
                          "--run", run, "--budget", "10"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and re.search(busy, err), err
        lease = location(run) / "lease.json"
        assert SECRET not in lease.read_bytes() and not (location(run) / "config.yaml").exists()  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    start = time.monotonic()
    with RunLease(run):  # the holder died on this machine: its lease is taken over without waiting for expiry
        assert time.monotonic() - start < 5
    assert not lease.exists()


# ---- ray-dal round and export ---------------------------------------------------------------------------


@pytest.mark.slow
def test_round_and_export_with_pool_labels_run_and_query_in_a_bucket(s3, s3_data, finished_run, bucket, log_dir,
                                                                     tmp_path, capsys):
    uri = f"s3://{bucket}/people"
    for r in (0, 1):  # the labels the simulation gave itself (see tests/test_round.py)
        labels = f"s3://{bucket}/labels_{r}.parquet"
        s3.upload(finished_run / f"round_{r:03d}" / "labeled.parquet", labels)
        ray_dal_main(["round", "--pool", f"{s3_data}/train.parquet", "--labels", labels, "--run", uri,
                      "--budget", "100", *ROUND_ARGS])
        out, err = capsys.readouterr()
        assert f"round {r}: trained on" in out and f"{uri}/round_{r:03d}/selected.parquet" in out
        assert str(log_dir / "s3" / bucket / "people" / "ray.log") in err
    copy = download(uri, tmp_path / "copy")
    for r in (0, 1):
        assert_same_round(copy / f"round_{r:03d}", finished_run / f"round_{r:03d}")
        assert sorted(p.name for p in (copy / f"round_{r:03d}").iterdir()) == ROUND_FILES

    ray_dal_main(["export", "--run", uri, "--format", "csv", "--out", f"s3://{bucket}/query.csv"])
    assert f"of {uri} to s3://{bucket}/query.csv" in capsys.readouterr().out
    exported = pacsv.read_csv(location(f"s3://{bucket}/query.csv").open_input())
    assert exported["id"].to_pylist() == pq.read_table(copy / "round_001" / "selected.parquet")["id"].to_pylist()
    assert_no_secret(uri, log_dir / "s3" / bucket / "people" / "ray.log")

