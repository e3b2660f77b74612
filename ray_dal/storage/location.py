"""`Location`: one file or folder, on local disk or in an object store, and the few operations ray_dal needs.

Accepted spellings: a local path (``runs/x``, ``~/pools/p.parquet``), ``file:///abs/path``,
``s3://bucket/key``, ``gs://bucket/key``, ``hdfs://host:port/path``. A local path is made absolute
(``~`` expanded) when parsed, so a `Location` means the same file in every process of the job.

S3 settings come from the environment as AWS tools read them: credentials (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and the config files), the region
(``AWS_REGION`` / ``AWS_DEFAULT_REGION``) and the endpoint of an S3-compatible store
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, which pyarrow itself ignores, apache/arrow#49643).
The endpoint, the region and the retry budget (``RAY_DAL_S3_MAX_ATTEMPTS`` tries per request,
default 8, and ``RAY_DAL_S3_TIMEOUT_S`` per try) are read once, in the process that parses the URI,
and travel with the `Location` to every Ray worker; credentials never do: each process's AWS SDK
reads its own environment.

Writes are whole-object: `Location.write_bytes` makes the new content visible at once or not at all
(a temp file and a rename on disk, one PUT in an object store). Every failure is a `StorageError`
whose message names the URI, the reason and the fix, and never a secret.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

_REMOTE = ("s3", "gs", "hdfs")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
DEFAULT_S3_MAX_ATTEMPTS = 8


class StorageError(RuntimeError):
    """A file or folder could not be reached, read or written; the message names the URI, why, and the fix."""


@dataclass(frozen=True)
class Store:
    """A filesystem's settings, without secrets: what a Ray worker needs to open the same files."""

    scheme: str  # "file" | "s3" | "gs" | "hdfs"
    authority: str = ""  # hdfs: host:port
    endpoint: str | None = None  # s3: an S3-compatible store's URL (None: AWS)
    region: str | None = None
    max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS
    timeout_s: float | None = None


@functools.lru_cache(maxsize=None)
def filesystem(store: Store) -> pafs.FileSystem:
    """The pyarrow filesystem for ``store``, built once per process (credentials from this process's environment)."""
    if store.scheme == "file":
        return pafs.LocalFileSystem()
    if store.scheme == "s3":
        options = {}
        if store.timeout_s is not None:
            options.update(request_timeout=store.timeout_s, connect_timeout=min(store.timeout_s, 10.0))
        return pafs.S3FileSystem(endpoint_override=store.endpoint, region=store.region,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=store.max_attempts),
                                 **options)
    if store.scheme == "gs":
        return pafs.GcsFileSystem()
    host, _, port = store.authority.partition(":")
    return pafs.HadoopFileSystem(host or "default", int(port or 0))


@dataclass(frozen=True)
class Location:
    """A file or folder: ``store`` says which filesystem, ``path`` where in it (disk: absolute; buckets: ``bucket/key``)."""

    store: Store
    path: str

    # ---- naming -------------------------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        if self.store.scheme == "file":
            return self.path
        if self.store.scheme == "hdfs":
            return f"hdfs://{self.store.authority}{self.path}"
        return f"{self.store.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> "Location":
        return replace(self, path=f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> "Location":
        return replace(self, path=self.path.rstrip("/").rsplit("/", 1)[0] or "/")

    @property
    def is_local(self) -> bool:
        return self.store.scheme == "file"

    @property
    def local(self) -> Path:
        """The local path; `StorageError` for an object-store location."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is in object storage, but this step needs a local path")
        return Path(self.path)

    @property
    def fs(self) -> pafs.FileSystem:
        store = self.store
        if store.scheme == "s3" and store.region is None:  # AWS, region not configured: ask S3 (once per bucket)
            store = replace(store, region=_bucket_region(self.path.split("/", 1)[0]))
        return filesystem(store)

    # ---- queries --------------------------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        with self.errors("looking up"):
            try:
                return self.fs.get_file_info(self.path)
            except OSError as error:
                if "ACCESS_DENIED during HeadObject" in str(error):
                    # a HEAD answer has no body, so it cannot say why: a listing's answer does (e.g. wrong secret)
                    self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
                raise

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder (in an object store: a prefix with at least one object under it, or a folder marker)."""
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        return self.info().size

    def children(self) -> list["Location"]:
        """What lies directly in this folder, sorted by name ([] when the folder does not exist)."""
        with self.errors("listing"):
            if self.info().type != pafs.FileType.Directory:
                return []
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((replace(self, path=i.path) for i in infos), key=lambda loc: loc.name)

    def files(self, suffix: str = "") -> list["Location"]:
        """The files (not folders) directly in this folder whose names end with ``suffix``, sorted by name."""
        with self.errors("listing"):
            if self.info().type != pafs.FileType.Directory:
                return []
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        found = [replace(self, path=i.path) for i in infos
                 if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]
        return sorted(found, key=lambda loc: loc.name)

    def check_bucket(self, what: str) -> None:
        """`StorageError` when this location lies in a bucket (s3://, gs://) that does not exist; ``what`` names it."""
        if self.store.scheme in ("s3", "gs"):
            bucket = replace(self, path=self.path.split("/", 1)[0])
            if not bucket.exists():
                raise StorageError(f"{what} {self.uri}: bucket {bucket.name!r} does not exist. Fix: create the bucket "
                                   "or correct the URI")

    # ---- reading and writing --------------------------------------------------------------------------------
    def read_bytes(self) -> bytes:
        with self.errors("reading"), self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def open_input(self) -> pa.NativeFile:
        """A seekable file (for pyarrow readers); the caller closes it."""
        with self.errors("opening"):
            return self.fs.open_input_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Replace this file's content with ``data``, all at once (readers never see a part of it)."""
        with self.errors("writing"):
            if self.is_local:
                path = Path(self.path)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                return
            with self.fs.open_output_stream(self.path) as f:  # an object appears only when its stream closes
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self) -> None:
        """Create this folder on disk; nothing to do in an object store (a prefix exists once it holds an object)."""
        if self.is_local:
            with self.errors("creating"):
                Path(self.path).mkdir(parents=True, exist_ok=True)

    def delete(self) -> None:
        """Delete this file or folder with all it holds; nothing happens when it does not exist."""
        with self.errors("deleting"):
            kind = self.fs.get_file_info(self.path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(self.path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(self.path)

    @contextlib.contextmanager
    def errors(self, action: str) -> Iterator[None]:
        """Turn a filesystem failure inside the block into a `StorageError` about this location."""
        try:
            yield
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as error:
            raise StorageError(explain(error, action, self)) from None


LOG_DIR_ENV = "RAY_DAL_LOG_DIR"  # where local stand-ins of object-store locations go (`local_stand_in`)


def local_stand_in(where: Location) -> Path:
    """A local path for a file that must be local but belongs with ``where`` (e.g. a log, which Ray writes
    through a file descriptor): ``where`` itself on disk; else ``$RAY_DAL_LOG_DIR/<scheme>/<bucket>/<key>``,
    by default under ``${XDG_CACHE_HOME:-~/.cache}/ray_dal/logs``."""
    if where.is_local:
        return where.local
    base = os.environ.get(LOG_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "ray_dal" / "logs"
    return Path(base).expanduser() / where.store.scheme / where.store.authority / where.path.lstrip("/")


def location(where: "str | Path | Location") -> Location:
    """Parse a local path or a URI (see the module docstring); `StorageError` when it is malformed."""
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:/", text) and not os.path.exists(text):
            raise StorageError(f"{text!r} is not a valid URI: write scheme://..., e.g. s3://bucket/key")
        return Location(Store("file"), str(Path(text).expanduser().absolute()))
    scheme = scheme.lower()
    if scheme == "file":
        if not rest.startswith("/"):
            raise StorageError(f"{text!r} is not a valid file URI. Fix: file:///absolute/path (three slashes)")
        return Location(Store("file"), str(Path(rest).absolute()))
    if scheme not in _REMOTE:
        raise StorageError(f"{text!r}: unsupported scheme {scheme!r}. Fix: use a local path, file://, s3://, "
                           "gs:// or hdfs://")
    if scheme == "hdfs":
        authority, _, path = rest.partition("/")
        return Location(Store("hdfs", authority=authority), "/" + path.rstrip("/"))
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise StorageError(f"{text!r}: {bucket!r} is not a valid bucket name (3-63 characters: lower-case letters, "
                           f"digits, '.', '-'). Fix: write {scheme}://BUCKET/KEY")
    path = f"{bucket}/{key.strip('/')}".rstrip("/")
    if scheme == "gs":
        return Location(Store("gs"), path)
    return Location(_s3_store(), path)


def _s3_store() -> Store:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and not re.match(r"^https?://[^/\s]+", endpoint):
        name = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        raise StorageError(f"{name}={endpoint!r} is not an endpoint URL. Fix: set it to http(s)://HOST:PORT, e.g. "
                           "http://127.0.0.1:9000 for a local MinIO, or unset it for AWS S3")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    if region is None and endpoint:
        region = "us-east-1"
    attempts = _env_number("RAY_DAL_S3_MAX_ATTEMPTS", int, DEFAULT_S3_MAX_ATTEMPTS)
    timeout = _env_number("RAY_DAL_S3_TIMEOUT_S", float, None)
    return Store("s3", endpoint=endpoint, region=region, max_attempts=attempts, timeout_s=timeout)


@functools.lru_cache(maxsize=None)
def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, pa.ArrowException) as error:
        raise StorageError(f"cannot find the region of bucket {bucket!r}: {_scrub(str(error))}. Fix: set AWS_REGION "
                           "(and AWS_ENDPOINT_URL for an S3-compatible store such as MinIO)") from None


def _env_number(name: str, kind: type, default):
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise StorageError(f"{name}={value!r} is invalid: give a positive {kind.__name__}")
    return number


def explain(error: BaseException, action: str, where: Location) -> str:
    """A one-paragraph message for a failed filesystem call: the URI, the reason and the fix; no secrets."""
    text = _scrub(str(error))
    bucket = where.path.split("/", 1)[0]
    if isinstance(error, FileNotFoundError) or "NoSuchKey" in text or "Path does not exist" in text:
        reason, fix = "it does not exist", "check the path or URI"
    elif "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        reason, fix = f"bucket {bucket!r} does not exist", "create the bucket or correct the URI"
    elif any(code in text for code in ("SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "INVALID_ACCESS_KEY_ID",
                                       "InvalidAccessKeyId", "InvalidClientTokenId", "ExpiredToken")):
        reason, fix = "the store rejected the credentials", ("set valid AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                                             "(or AWS_PROFILE) in the environment of every node")
    elif "ACCESS_DENIED" in text or "AccessDenied" in text or re.search(r"(?<![:\d])403(?!\d)", text):  # not a port
        reason, fix = "access denied", "grant these credentials access to the bucket, or use others"
    elif "curlCode: 7" in text or "NETWORK_CONNECTION" in text or "curlCode: 28" in text or "curlCode: 6" in text:
        endpoint = where.store.endpoint or "AWS S3"
        reason = f"cannot reach the store at {endpoint} (after {where.store.max_attempts} tries)"
        fix = ("check that the store is up and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 point at it; "
               "raise RAY_DAL_S3_MAX_ATTEMPTS to wait longer through outages")
    else:
        reason, fix = text, "check the URI, the credentials and that the store is reachable"
    return f"{action} {where.uri} failed: {reason}. Fix: {fix}. ({type(error).__name__}: {text})"


def _scrub(text: str) -> str:
    for name in _SECRETS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
