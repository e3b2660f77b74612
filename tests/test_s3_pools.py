"""Pools, labels files and checkpoints in object storage, against a real S3 API server (moto) and a real Ray.

`ray-dal select` on s3:// gives the query it gives on the same local files; the driver reads footers and
the id/label columns, never the images (counted on the wire by a TCP proxy in front of the server); a
missing bucket or key, a malformed URI, an unreachable store and wrong credentials are clear errors before
any Ray work, without the secret; a store that goes away during scoring is waited for (the query does
not change) or, past the retry budget, a clear `StorageError` from the read task that met it. For the
restart, a proxy refuses connections while moto restarts and is refilled (moto forgets every bucket, and
a request that reached the empty server would get NoSuchBucket, which no client retries).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_dal.cli import main as ray_dal_main
from ray_dal.config import ModelConfig, ScoringConfig
from ray_dal.data import inspect_pool, read_ids, read_label_file, read_labels, read_pool
from ray_dal.data.labels import load_labels, write_label_file
from ray_dal.data.pools import PoolError, read_labeled, read_rows
from ray_dal.errors import carried, original_errors
from ray_dal.models import build_model
from ray_dal.pipeline.actors import load_weights_file
from ray_dal.pipeline.pool_scoring import score_pool
from ray_dal.storage import StorageError, location

from .conftest import REPO
from .label_studio_server import free_port
from .s3_server import ENV, S3Server

SECRET = ENV["AWS_SECRET_ACCESS_KEY"]
LABELED = 20
BUDGET = 10


# ---- a TCP proxy in front of an S3 server: counts the bytes the store sends, and can go away -----------------


class Proxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``; ``received`` counts the bytes the server sent back, and
    ``requests`` lists each request's (method, path, byte range or None for the whole object).

    `down` stops listening and cuts every open connection (clients see the store gone: connection
    refused); `up` listens again on the same port.
    """

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.received = 0
        self.requests: list[tuple[str, str, tuple[int, int] | None]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        self._listener.close()
        with self._lock:
            for conn in list(self._open):
                _close(conn)
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if count:
                        self.received += len(data)
                    else:  # a request: note its line and Range header (the driver sends no bodies here)
                        pending += data
                        while b"\r\n\r\n" in pending:
                            head, pending = pending.split(b"\r\n\r\n", 1)
                            self._note(head.decode("latin-1"))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (src, dst):
                _close(conn)
                with self._lock:
                    self._open.discard(conn)


    def _note(self, head: str) -> None:
        match = re.match(r"([A-Z]+) (\S+) HTTP", head)
        if match is None:
            return  # a request body's bytes
        span = re.search(r"(?im)^range: bytes=(\d+)-(\d+)", head)
        self.requests.append((match[1], match[2].split("?")[0], (int(span[1]), int(span[2])) if span else None))


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_files(cifar10_slice, tmp_path_factory) -> dict[str, Path]:
    """The pool (2,000 real images, 4 row groups), a seeded cnn's model.pt and 20 labeled ids, on local disk."""
    folder = tmp_path_factory.mktemp("s3_pools")
    pool = cifar10_slice / "train.parquet"
    torch.manual_seed(0)
    torch.save(build_model("cnn", 10).state_dict(), folder / "model.pt")
    pq.write_table(pq.read_table(pool, columns=["id", "label"]).slice(0, LABELED), folder / "labeled.parquet")
    return {"pool": pool, "checkpoint": folder / "model.pt", "labeled": folder / "labeled.parquet"}


@pytest.fixture(scope="module")
def remote(s3, local_files) -> dict[str, str]:
    """The same files in a bucket of the session's S3 server (the pool as a prefix holding one shard)."""
    bucket = s3.create_bucket()
    uris = {"pool": f"s3://{bucket}/pools/cifar", "checkpoint": f"s3://{bucket}/models/model.pt",
            "labeled": f"s3://{bucket}/labels/labeled.parquet"}
    s3.upload(local_files["pool"], f"{uris['pool']}/train.parquet")
    for name in ("checkpoint", "labeled"):
        s3.upload(local_files[name], uris[name])
    return uris


def select_argv(files: dict, out, **flags) -> list[str]:
    args = {**files, "budget": BUDGET, "out": out, "num_scorers": 1, **flags}
    return ["select", *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


def image_chunks(pool: Path) -> list[tuple[int, int]]:
    """(offset, size) in the Parquet file of each row group's image column chunk."""
    footer = pq.ParquetFile(pool).metadata
    chunks = [footer.row_group(i).column(j) for i in range(footer.num_row_groups) for j in range(footer.num_columns)]
    return [(c.dictionary_page_offset or c.data_page_offset, c.total_compressed_size) for c in chunks
            if c.path_in_schema == "image"]


def image_bytes(pool: Path) -> int:
    """The bytes the pool's images take in its file (compressed column chunks): what reading them costs."""
    return sum(size for _, size in image_chunks(pool))


# ---- (a) the same query from s3:// as from local files ----------------------------------------------------


def test_select_on_s3_gives_the_local_query_and_writes_it_to_s3(ray_local, local_files, remote, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ray_dal_main(select_argv(local_files, tmp_path / "local.parquet"))
    out = f"{remote['pool'].rsplit('/', 2)[0]}/queries/q.parquet"
    ray_dal_main(select_argv(remote, out))
    assert f"to {out}" in capsys.readouterr().out
    want = pq.read_table(tmp_path / "local.parquet")
    got = pq.read_table(pa.BufferReader(location(out).read_bytes()))
    assert got.column_names == want.column_names and got.num_rows == BUDGET
    np.testing.assert_array_equal(got["id"].to_numpy(), want["id"].to_numpy())
    np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-6)
    assert not np.isin(got["id"].to_numpy(), pq.read_table(local_files["labeled"])["id"].to_numpy()).any()
    logs = list((tmp_path / "cache" / "ray_dal" / "logs").rglob("*.log"))  # --out a URI: the log stays local
    assert [p.relative_to(tmp_path / "cache" / "ray_dal" / "logs").as_posix() for p in logs] == \
        [out.replace("s3://", "s3/").removesuffix(".parquet") + ".log"]


# ---- (b) the data layer reads the same from s3:// -----------------------------------------------------------


def test_inspect_and_read_a_pool_on_s3_equal_the_local_ones(ray_local, local_files, remote):
    here, there = inspect_pool(local_files["pool"]), inspect_pool(remote["pool"])
    assert there.source == remote["pool"] and there.files == (f"{remote['pool']}/train.parquet",)
    assert here.files == (str(local_files["pool"].resolve()),)  # local: plain absolute paths, as before
    assert (there.num_rows, there.has_label, there.has_id_column) == (here.num_rows, here.has_label, here.has_id_column)
    assert [(g.index, g.offset, g.num_rows) for g in there.row_groups] == \
           [(g.index, g.offset, g.num_rows) for g in here.row_groups]
    for a, b in zip(read_labels(there), read_labels(here)):
        np.testing.assert_array_equal(a, b)
    ids = read_ids(here)[::7]
    labels = np.arange(ids.size) % 10
    for pool in (here, there):
        assert inspect_pool([pool.files[0]]).num_rows == here.num_rows  # a list of files, too
    got, want = (read_labeled(p, ids, labels).to_pandas().sort_values("id") for p in (there, here))
    assert got["id"].tolist() == sorted(ids.tolist()) and got.equals(want)
    np.testing.assert_array_equal(read_rows(there, ids[:5])["image"], read_rows(here, ids[:5])["image"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_labels_files_and_checkpoints_round_trip_through_s3(ray_local, local_files, remote, bucket, suffix):
    uri = f"s3://{bucket}/labels/people{suffix}"
    ids = read_ids(inspect_pool(local_files["pool"]))[:5]
    assert write_label_file(uri, ids, ["3", "cat", "1", "0", "9"]).uri == uri
    keys, labels = read_label_file(uri)
    assert keys.tolist() == ids.tolist() and labels.tolist() == ["3", "cat", "1", "0", "9"]
    got = load_labels(remote["labeled"], inspect_pool(remote["pool"]), None, 10, "--labeled")
    want = load_labels(local_files["labeled"], inspect_pool(local_files["pool"]), None, 10, "--labeled")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    remote_state = load_weights_file(remote["checkpoint"], "Fix: -")
    local_state = load_weights_file(local_files["checkpoint"], "Fix: -")
    assert remote_state.keys() == local_state.keys()
    assert all(torch.equal(remote_state[k], local_state[k]) for k in local_state)


# ---- (c) the driver never downloads images ----------------------------------------------------------------


def test_the_driver_reads_footers_and_small_columns_never_images(ray_local, s3, local_files, remote,
                                                                  monkeypatch):
    proxy = Proxy(s3.port)
    proxy.up()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # parsed into each Location: its reads go through
        pool_uri = remote["pool"]
        whole = location(f"{pool_uri}/train.parquet")
        size, first = whole.size(), len(proxy.requests)
        whole.read_bytes()  # calibration: a whole-object read (in ranges) is counted and seen in full
        spans = [span or (0, size - 1) for method, _, span in proxy.requests[first:] if method == "GET"]
        assert proxy.received >= size and sum(b - a + 1 for a, b in spans) == size
        before, first = proxy.received, len(proxy.requests)
        info = inspect_pool(pool_uri)  # everything `ray-dal select` and score_pool do on the driver with the pool
        ids, _ = read_labels(info)
        load_labels(remote["labeled"], info, None, 10, "--labeled")
        ds = read_pool(info, ids=ids[LABELED:])
        read_labeled(info, ids[:LABELED], np.zeros(LABELED))
        assert ds.schema().names == ["id", "image", "label"]
        driver, requests = proxy.received - before, proxy.requests[first:]
    finally:
        proxy.down()
    images = image_chunks(local_files["pool"])
    key = "/" + whole.path
    pool_reads = [span for method, path, span in requests if method == "GET" and path == key]
    assert pool_reads and all(span is not None for span in pool_reads)  # only ranges, never the whole file
    overlapping = [(a, b) for a, b in pool_reads for start, size in images if a < start + size and b >= start]
    assert not overlapping, f"the driver read image bytes: ranges {overlapping}"
    image_stored = image_bytes(local_files["pool"])
    print(f"driver: {driver} bytes in {len(requests)} requests ({len(pool_reads)} ranged reads of the pool file); "
          f"the pool's image column takes {image_stored} bytes of its file")
    assert driver < image_stored / 5


# ---- (d) missing, malformed and unreachable: clear errors before any Ray work --------------------------------

CHECK_ERRORS = r"""
import contextlib, io, json, sys
import ray
from ray_dal.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    results.append({"code": code, "err": err.getvalue()})
print(json.dumps({"results": results, "ray_started": ray.is_initialized()}))
"""


def run_checks(argvs: list[list[str]], env: dict[str, str], timeout: float = 120) -> dict:
    done = subprocess.run([sys.executable, "-c", CHECK_ERRORS, json.dumps(argvs)], capture_output=True, text=True,
                          env={**os.environ, **env}, cwd=REPO, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_missing_malformed_and_unreachable_give_clear_errors_before_ray(s3, local_files, remote, tmp_path):
    bucket = remote["pool"].removeprefix("s3://").split("/")[0]
    out = str(tmp_path / "q.parquet")
    cases = {  # what is wrong -> (flags, what the message must say)
        "missing pool bucket": ({"pool": "s3://no-such-bucket-4b1d/pool"},
                                r"bucket 'no-such-bucket-4b1d' does not exist\. Fix: create the bucket"),
        "missing pool key": ({"pool": f"s3://{bucket}/pools/nothing.parquet"},
                             rf"pool path 's3://{bucket}/pools/nothing.parquet' does not exist\. Fix:"),
        "missing checkpoint": ({"checkpoint": f"s3://{bucket}/models/none.pt"},
                               rf"weights file 's3://{bucket}/models/none.pt' does not exist\. Fix:"),
        "missing labeled": ({"labeled": f"s3://{bucket}/labels/none.csv"},
                            rf"labels file s3://{bucket}/labels/none.csv does not exist"),
        "out in a missing bucket": ({"out": "s3://no-such-bucket-4b1d/q.parquet"},
                                    r"--out s3://no-such-bucket-4b1d/q.parquet: bucket 'no-such-bucket-4b1d' does not "
                                    r"exist\. Fix:"),
        "malformed s3:/x": ({"pool": "s3:/x"}, r"'s3:/x' is not a valid URI: write scheme://"),
        "malformed s3://": ({"pool": "s3://"}, r"'s3://': '' is not a valid bucket name .* Fix: write s3://BUCKET/KEY"),
        "malformed checkpoint": ({"checkpoint": "s3://Bad_Bucket/m.pt"}, r"'Bad_Bucket' is not a valid bucket name"),
    }
    argvs = [select_argv({**remote, **{k: v for k, v in flags.items() if k != "out"}}, flags.get("out", out))
             for flags, _ in cases.values()]
    got = run_checks(argvs, {})
    assert not got["ray_started"]
    for (name, (_, says)), result in zip(cases.items(), got["results"]):
        err = result["err"]
        assert result["code"] == 2 and err.startswith("ray-dal select: error: "), (name, err)
        assert re.search(says, err), (name, err)
        assert "Traceback" not in err and SECRET not in err, (name, err)

    # the store cannot be reached: each try fails at once (connection refused), 2 tries per request
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    got = run_checks([select_argv({**remote}, out)], {"AWS_ENDPOINT_URL": dead, "RAY_DAL_S3_MAX_ATTEMPTS": "2"})
    err = got["results"][0]["err"]
    assert not got["ray_started"] and got["results"][0]["code"] == 2, err
    assert f"{remote['pool']} failed: cannot reach the store at {dead} (after 2 tries)" in err, err
    assert "Fix: check that the store is up and AWS_ENDPOINT_URL" in err and SECRET not in err, err
    assert time.monotonic() - started < 60


def test_label_studio_pull_checks_an_s3_out_before_asking_label_studio(s3, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # no Label Studio there: the bucket is checked first
    with pytest.raises(SystemExit) as exit_info:
        ray_dal_main(["label-studio", "pull", "--url", closed, "--project", "p", "--out",
                      "s3://no-such-bucket-4b1d/labels.csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and SECRET not in err
    assert err.startswith("ray-dal label-studio: error: --out s3://no-such-bucket-4b1d/labels.csv: bucket "
                          "'no-such-bucket-4b1d' does not exist. Fix: create the bucket"), err


def test_an_s3_folder_of_images_or_a_dataset_layout_is_refused_with_how_to_convert(s3, bucket, tmp_path):
    from ray_dal.data import resolve_pool
    from ray_dal.data.datasets import get_dataset

    s3.filesystem().open_output_stream(f"{bucket}/photos/cats/a.jpg").close()
    with pytest.raises(PoolError, match=rf"s3://{bucket}/photos is a folder of image files in object storage.*Fix: "
                                        r"copy it to a local folder DIR and run once with --pool DIR"):
        resolve_pool(f"s3://{bucket}/photos")
    s3.filesystem().open_output_stream(f"{bucket}/cifar/cifar-10-batches-py/data_batch_1").close()
    with pytest.raises(PoolError, match=rf"CIFAR-10 was not found as Parquet in s3://{bucket}/cifar \(found "
                                        r"\['cifar-10-batches-py'\]\).*Fix: run once with a local --data-dir DIR"):
        get_dataset("cifar10").resolve(f"s3://{bucket}/cifar")


def test_a_dataset_in_object_storage_is_used_as_parquet(s3, bucket, cifar10_slice):
    from ray_dal.data.datasets import get_dataset

    for split in ("train", "test"):
        s3.upload(cifar10_slice / f"{split}.parquet", f"s3://{bucket}/cifar/ray_dal_parquet/{split}.parquet")
    train, test = get_dataset("cifar10").resolve(f"s3://{bucket}/cifar")
    assert (train, test) == (f"s3://{bucket}/cifar/ray_dal_parquet/train.parquet",
                             f"s3://{bucket}/cifar/ray_dal_parquet/test.parquet")
    assert inspect_pool(test).num_rows == 300


# ---- (e) wrong credentials --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_server(s3, tmp_path_factory, local_files):
    """A second moto server that checks credentials: a user with an s3:* policy and its key; the pool uploaded
    (with `s3`'s credentials in the environment: moto keeps an unsigned pyarrow upload's chunk framing)."""
    import boto3

    port = free_port()
    server = S3Server(f"http://127.0.0.1:{port}", port, tmp_path_factory.mktemp("moto_auth") / "moto.log")
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="ray-dal")
        policy = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="ray-dal", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="ray-dal")["AccessKey"]
        bucket = server.create_bucket()
        server.upload(local_files["pool"], f"s3://{bucket}/pool.parquet")
        import urllib.request

        request = urllib.request.Request(f"{server.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=30).read()  # from now on every request must be signed correctly
        yield server, f"s3://{bucket}/pool.parquet", key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.stop()


def test_wrong_credentials_give_a_clear_error(auth_server, local_files, tmp_path):
    server, pool, key_id, secret = auth_server
    env = {"AWS_ENDPOINT_URL": server.endpoint, "RAY_DAL_S3_MAX_ATTEMPTS": "2"}
    argv = select_argv({**local_files, "pool": pool}, tmp_path / "q.parquet")
    cases = {"right": (key_id, secret), "wrong secret": (key_id, "wrong-" + secret[6:]),
             "unknown key id": ("AKIA" + uuid.uuid4().hex[:16].upper(), secret)}
    got = {}
    for name, (kid, sec) in cases.items():  # one process each: a process builds its filesystem once
        got[name] = run_checks([argv + ["--budget", "0"]], {**env, "AWS_ACCESS_KEY_ID": kid,
                                                          "AWS_SECRET_ACCESS_KEY": sec})["results"][0]["err"]
    assert "--budget 0 is invalid: pool " in got["right"], got["right"]  # the right key reads the pool
    for name in ("wrong secret", "unknown key id"):
        err = got[name]
        assert f"{pool} failed: the store rejected the credentials. Fix: set valid AWS_ACCESS_KEY_ID / " \
               "AWS_SECRET_ACCESS_KEY" in err, (name, err)
        assert secret not in err and secret[6:] not in err and "Traceback" not in err, (name, err)


# ---- (f) the store goes away while a pool is scored ---------------------------------------------------------


@pytest.fixture(scope="module")
def scoring_inputs(local_files):
    """A seeded cnn and the labeled ids (scored with gamma 0: no G needed to test the reads)."""
    state = torch.load(local_files["checkpoint"], weights_only=True)
    labeled = pq.read_table(local_files["labeled"])["id"].to_numpy()
    return state, labeled


def score(pool, state, labeled):
    return score_pool(pool, model_cfg=ModelConfig(), state_dict=state, grad_sum=None,
                      scoring_cfg=ScoringConfig(num_scorers=1, gamma=0.0), budget=BUDGET, exclude_ids=labeled, seed=0)


@pytest.fixture
def own_server(s3, tmp_path, local_files):
    """A moto server of this test alone (restarting it empties it), the pool uploaded (with `s3`'s credentials in
    the environment), behind a `Proxy`."""
    port = free_port()
    server = S3Server(f"http://127.0.0.1:{port}", port, tmp_path / "moto.log")
    server.start()
    proxy = Proxy(port)
    proxy.up()

    def fill() -> str:
        bucket = server.create_bucket("restart-test")
        server.upload(local_files["pool"], f"s3://{bucket}/pool.parquet")
        return f"s3://{bucket}/pool.parquet"

    try:
        yield server, proxy, fill
    finally:
        with contextlib.suppress(OSError):
            proxy.down()
        server.stop()


def test_a_store_restarted_during_scoring_is_waited_for_and_the_query_is_unchanged(
        ray_local, local_files, scoring_inputs, own_server, monkeypatch):
    server, proxy, fill = own_server
    reference = score(str(local_files["pool"]), *scoring_inputs)
    uri = fill()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RAY_DAL_S3_MAX_ATTEMPTS", "10")  # carried by the Location to the read tasks
    info = inspect_pool(uri)
    proxy.down()
    server.restart()  # moto forgets everything: the bucket is made and the pool uploaded again, behind the proxy
    fill()
    back = {}

    def come_back() -> None:
        time.sleep(4)
        back["received"], back["at"] = proxy.received, time.monotonic()
        proxy.up()

    threading.Thread(target=come_back, daemon=True).start()
    started = time.monotonic()
    query = score(info, *scoring_inputs)
    finished = time.monotonic()
    assert finished > back.get("at", np.inf) and finished - started < 120  # it waited for the store, in budget
    assert proxy.received - back["received"] > image_bytes(local_files["pool"])  # the images came after the outage
    np.testing.assert_array_equal(query.ids, reference.ids)
    np.testing.assert_allclose(query.scores, reference.scores, rtol=1e-6)


def test_a_store_gone_for_good_fails_the_read_task_with_a_clear_storage_error(
        ray_local, local_files, scoring_inputs, own_server, monkeypatch):
    server, proxy, fill = own_server
    uri = fill()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RAY_DAL_S3_MAX_ATTEMPTS", "3")
    info = inspect_pool(uri)
    ds = read_pool(info)  # the driver's part done: the images are read by the read tasks alone
    proxy.down()
    started = time.monotonic()
    with pytest.raises(StorageError) as error, original_errors("reading the pool"):
        carried(ds).materialize()
    message = str(error.value)
    assert re.search(rf"(opening|reading) {uri} failed: cannot reach the store at {proxy.endpoint} \(after 3 tries\)",
                     message), message
    assert "Fix: check that the store is up" in message and SECRET not in message
    assert "(raised inside reading the pool)" in getattr(error.value, "__notes__", [""])[0]
    # and score_pool itself, the store still gone: a StorageError too, within the retry budget
    with pytest.raises(StorageError, match=r"cannot reach the store .* Fix:"):
        score(info, *scoring_inputs)
    assert time.monotonic() - started < 120
