"""ray_dal.storage against local disk and a real S3 API server (moto): URIs, whole-object writes, errors, leases."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time

import pytest

from ray_dal.storage import RunBusyError, RunLease, StorageError, location
from ray_dal.storage.location import filesystem

from .s3_server import ENV


@pytest.fixture(params=["disk", "s3"])
def root(request, tmp_path):
    """An empty folder: on local disk, or a fresh bucket's prefix on the S3 server."""
    if request.param == "disk":
        return location(tmp_path / "root")
    return location(f"s3://{request.getfixturevalue('bucket')}/root")


def test_paths_and_uris_parse_to_the_same_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert location("a/b").uri == str(tmp_path / "a" / "b")
    assert location(f"file://{tmp_path}/a/b") == location(tmp_path / "a" / "b")
    assert location("~/x").uri == os.path.expanduser("~/x")
    s3 = location("s3://my-bucket/pools/p.parquet/")
    assert (s3.uri, s3.name, s3.parent.uri) == ("s3://my-bucket/pools/p.parquet", "p.parquet", "s3://my-bucket/pools")
    assert (s3.parent / "q").uri == "s3://my-bucket/pools/q"


@pytest.mark.parametrize("uri, says", [
    ("s3://", "not a valid bucket name"), ("s3://A_Bucket/key", "not a valid bucket name"),
    ("s3:/bucket/key", "not a valid URI"), ("ftp://host/x", "unsupported scheme 'ftp'"),
    ("file://relative/x", "three slashes"),
])
def test_a_malformed_uri_is_refused_with_the_fix(uri, says):
    with pytest.raises(StorageError, match=says):
        location(uri)


def test_a_bad_endpoint_is_refused_before_any_request(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "127.0.0.1:9000")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL='127.0.0.1:9000' is not an endpoint URL"):
        location("s3://bucket/x")


def test_files_round_trip_and_list_in_both_stores(root):
    assert not root.exists() and root.children() == []
    (root / "b.txt").write_text("bee")
    (root / "a.parquet").write_bytes(b"\x00" * 10)
    (root / "sub" / "c.parquet").write_bytes(b"c")
    assert root.is_dir() and (root / "b.txt").is_file()
    assert [c.name for c in root.children()] == ["a.parquet", "b.txt", "sub"]
    assert [f.name for f in root.files(".parquet")] == ["a.parquet"]
    assert (root / "b.txt").read_text() == "bee" and (root / "a.parquet").size() == 10
    (root / "b.txt").write_text("replaced")
    assert (root / "b.txt").read_text() == "replaced"
    root.delete()
    assert not root.exists()
    root.delete()  # deleting what is not there is not an error


def test_a_location_pickles_without_secrets_and_works_in_another_process(bucket):
    where = location(f"s3://{bucket}/x.txt")
    where.write_text("hello")
    blob = pickle.dumps(where)
    assert ENV["AWS_SECRET_ACCESS_KEY"].encode() not in blob and ENV["AWS_ACCESS_KEY_ID"].encode() not in blob
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}  # the endpoint travels with the Location
    code = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()).read_text())"
    done = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, env=env, timeout=120)
    assert done.stdout.decode().strip() == "hello", done.stderr.decode()[-2000:]


def test_missing_bucket_missing_key_and_wrong_store_give_clear_errors(s3, bucket, monkeypatch):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/x.*does not exist.*Fix"):
        location("s3://no-such-bucket-here/x").read_bytes()
    with pytest.raises(StorageError, match=rf"reading s3://{bucket}/nothing failed: it does not exist"):
        location(f"s3://{bucket}/nothing").read_bytes()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on port 9
    monkeypatch.setenv("RAY_DAL_S3_MAX_ATTEMPTS", "2")
    with pytest.raises(StorageError, match=r"cannot reach the store at http://127.0.0.1:9 \(after 2 tries\)") as err:
        location(f"s3://{bucket}/x").read_bytes()
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_a_lease_refuses_a_second_holder_and_names_the_first(root):
    with RunLease(root, settle_s=0.01):
        with pytest.raises(RunBusyError, match=rf"in use by process {os.getpid()} on .*Fix: wait"):
            RunLease(root, settle_s=0.01).acquire()
    assert not (root / "lease.json").exists()
    with RunLease(root, settle_s=0.01):  # released: free again
        pass


def test_a_lease_of_a_dead_process_is_taken_over_at_once_and_an_expired_one_too(root):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    lease = RunLease(root, settle_s=0.01)
    lease._write()  # as if `sleeper` held it: same host, its pid
    held = (root / "lease.json").read_text().replace(f'"pid": {os.getpid()}', f'"pid": {sleeper.pid}')
    (root / "lease.json").write_text(held)
    with pytest.raises(RunBusyError, match=f"in use by process {sleeper.pid}"):
        RunLease(root, settle_s=0.01).acquire()
    sleeper.kill()
    sleeper.wait()
    with RunLease(root, settle_s=0.01):
        pass
    short = RunLease(root, ttl_s=0.5, settle_s=0.01)
    short._write()
    (root / "lease.json").write_text((root / "lease.json").read_text().replace('"host": "', '"host": "elsewhere-'))
    time.sleep(0.6)
    with RunLease(root, settle_s=0.01):  # a holder elsewhere that stopped renewing: expired
        pass


def test_filesystems_are_built_once_per_process(bucket):
    a, b = location(f"s3://{bucket}/a"), location(f"s3://{bucket}/b")
    assert a.store == b.store and filesystem(a.store) is filesystem(b.store)


def test_a_store_on_a_port_holding_403_is_unreachable_not_access_denied():
    """A refused connection to 127.0.0.1:40311 once read as "access denied" (the port holds "403")."""
    from ray_dal.storage.location import explain

    where = location("s3://bucket/pool.parquet")
    down = OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7, Could not connect to "
                   "server; Details: Failed to connect to 127.0.0.1:40311 after 0 ms: Could not connect to server")
    assert "failed: cannot reach the store at" in explain(down, "reading", where)
    denied = OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation")
    assert "failed: access denied. Fix:" in explain(denied, "reading", where)
