"""Pools: tables of samples (stable int64 id, encoded image, optional int label) in Parquet files.

A pool is one .parquet file, a directory of *.parquet shards (taken in file-name order) or a list of
files, each given as a local path or a URI (``file://``, ``s3://``, ``gs://``, ``hdfs://``; see
`ray_dal.storage.location`). Columns: ``image`` (binary, an encoded image), optional ``label`` (integer)
and optional ``id`` (integer, unique). Without an ``id`` column a sample's id is its global row index: its position
counting across the pool's files in order, which is stable as long as the files are.

The driver only ever reads footers and the small id/label columns (by byte range, also in an object
store); image bytes are read by Ray Data read tasks, one per Parquet row group, which reopen the file
from its pickled `Location` (no secrets travel with a task). A store that cannot be reached, a missing
bucket or denied access is a `StorageError` naming the URI and the fix: on the driver before any Ray
work, and from a read task through `ray_dal.errors.carry`.
"""

from __future__ import annotations

import functools
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from ray.exceptions import UserCodeException

from ray_dal.storage import Location, StorageError, location
from ray_dal.storage.location import explain

ID, IMAGE, LABEL = "id", "image", "label"
READ_CPUS = 0.25  # per read task: small, so reads keep running beside actors that hold most CPUs
_COLUMN_TYPES = {
    IMAGE: (lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t), "binary (encoded image bytes)"),
    LABEL: (pa.types.is_integer, "an integer class index"),
    ID: (pa.types.is_integer, "an integer"),
}
_FIX_FORMAT = "a pool needs an 'image' binary column, and optionally 'label' (integer) and 'id' (unique integer)"


class PoolError(ValueError):
    """A pool is missing, unreadable or malformed; the message names the path and the fix."""


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group; ``offset`` is the global row index of its first row across the pool's files."""

    file: Location
    index: int
    offset: int
    num_rows: int
    size_bytes: int = 0  # uncompressed size of all its columns, from the footer (a memory estimate)

    @property
    def path(self) -> str:
        """The file's URI (a plain absolute path on local disk)."""
        return self.file.uri


@dataclass(frozen=True)
class PoolInfo:
    """A checked pool: ``source`` (its URI, or the files' common folder), its files in order, its row groups."""

    source: str
    locations: tuple[Location, ...]
    num_rows: int
    has_label: bool
    has_id_column: bool
    row_groups: tuple[RowGroup, ...]
    footers: tuple[tuple[int, pq.FileMetaData] | None, ...] = ()  # per file: (size, footer) in an object store

    def footer(self, where: Location) -> tuple[int, pq.FileMetaData] | None:
        """(size, footer) of the pool's file ``where`` as inspect_pool read them; None: read them again."""
        return dict(zip(self.locations, self.footers)).get(where)

    @property
    def files(self) -> tuple[str, ...]:
        """The files' URIs (plain absolute paths on local disk)."""
        return tuple(f.uri for f in self.locations)


def _list_files(source: str | Path | Sequence[str | Path]) -> list[Location]:
    if isinstance(source, (str, Path)):
        where = _resolved(location(source))
        kind = where.info().type
        if kind == pafs.FileType.NotFound:
            where.check_bucket("pool")
            raise PoolError(f"pool path {where.uri!r} does not exist. Fix: point it at a .parquet file or a "
                            f"folder{'' if where.is_local else ' (prefix)'} of .parquet shards")
        if kind == pafs.FileType.Directory:
            files = where.files(".parquet")
            if not files:
                found = [c.name for c in where.children()][:10]
                raise PoolError(f"pool folder {where.uri!r} holds no *.parquet files (found {found}). Fix: point "
                                "it at a folder of .parquet shards or at one .parquet file")
            return [_resolved(f) for f in files]
        return [where]
    files = [_resolved(location(p)) for p in source]
    if not files:
        raise PoolError("pool file list is empty. Fix: pass at least one .parquet file")
    for f in files:
        if not f.is_file():
            f.check_bucket("pool file")
            raise PoolError(f"pool file {f.uri!r} does not exist or is not a file. Fix: pass existing .parquet files")
    return files


def _resolved(where: Location) -> Location:
    """A local file with its links resolved (as pools have always been named); a URI as it is."""
    return location(Path(where.path).resolve()) if where.is_local else where


def _common_source(files: list[Location]) -> str:
    """The common folder of a list of files, as a URI."""
    if len({f.store for f in files}) > 1:
        return ", ".join(f.uri for f in files)
    return replace(files[0], path=os.path.commonpath([f.path for f in files])).uri


def _check_schema(path: str, schema: pa.Schema) -> tuple[bool, bool]:
    """Validate one file's columns; returns (has_label, has_id_column)."""
    names = schema.names
    if IMAGE not in names:
        raise PoolError(f"{path}: no 'image' column (columns found: {names}). Fix: {_FIX_FORMAT}")
    for name, (ok, what) in _COLUMN_TYPES.items():
        if name in names and not ok(schema.field(name).type):
            raise PoolError(f"{path}: column '{name}' has type {schema.field(name).type}, but it must be {what}. "
                            f"Fix: {_FIX_FORMAT}")
    return LABEL in names, ID in names


def _open(where: Location, footer: tuple[int, pq.FileMetaData] | None = None) -> pq.ParquetFile:
    """The Parquet file at ``where``; the caller closes it. In an object store its footer is read by range, or
    taken from ``footer`` (size, footer) when the file still has that size (not re-read on every open).

    A store failure (unreachable, no bucket, denied) is a `StorageError`; a file that is not Parquet a `PoolError`.
    """
    handle = where.open_input()
    try:
        if where.is_local:
            metadata = None  # the reader's own footer read: a local read costs nothing per request
        elif footer is not None and footer[0] == handle.size():
            metadata = footer[1]
        else:
            metadata = _footer(handle)
        return pq.ParquetFile(handle, metadata=metadata)
    except Exception as e:
        handle.close()
        if _store_failure(where, e):
            raise StorageError(explain(e, "reading", where)) from None
        raise PoolError(f"cannot read {where.uri} as Parquet ({type(e).__name__}: {e}). Fix: check the file is a "
                        "complete Parquet file (re-write or re-download it), or remove it from the pool") from None


def _footer(handle: pa.NativeFile) -> pq.FileMetaData | None:
    """The file's Parquet footer, read with two small range requests (the reader's own first read is the
    file's last 64 KiB, mostly image bytes in a pool); None when the file does not end like Parquet."""
    size = handle.size()
    tail = handle.read_at(8, size - 8) if size >= 12 else b""
    length = int.from_bytes(tail[:4], "little") if tail[4:] == b"PAR1" else 0
    if not 0 < length <= size - 12:
        return None  # not Parquet (or an encrypted footer): pq.ParquetFile says what is wrong
    footer = handle.read_at(length, size - 8 - length)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))


def _store_failure(where: Location, error: BaseException) -> bool:
    """Whether ``error`` (raised while reading ``where``) is the store's failure rather than bad Parquet bytes."""
    text = str(error)
    return not where.is_local and isinstance(error, OSError) and not ("Parquet" in text or "thrift" in text)


def _read_file(where: Location, read, footer: tuple[int, pq.FileMetaData] | None = None):
    """``read(pq.ParquetFile)`` on the file ``where`` (``footer`` as `_open`'s); store failures become
    `StorageError` naming it."""
    pf = _open(where, footer)
    try:
        return read(pf)
    except Exception as e:
        if _store_failure(where, e):
            raise StorageError(explain(e, "reading", where)) from None
        raise
    finally:
        pf.close(force=True)  # also the file handle _open gave it


def inspect_pool(source: str | Path | Sequence[str | Path]) -> PoolInfo:
    """Describe and validate a pool from the Parquet footers (plus the ``id`` column, to check uniqueness)."""
    files = _list_files(source)
    row_groups: list[RowGroup] = []
    footers: list[tuple[int, pq.FileMetaData] | None] = []
    flags = None
    offset = 0
    for where in files:
        schema, metadata = _read_file(where, lambda pf: (pf.schema_arrow, pf.metadata))
        # kept for the driver's later reads of an object (a local footer read costs nothing)
        footers.append(None if where.is_local else (where.size(), metadata))
        file_flags = _check_schema(where.uri, schema)
        if flags is None:
            flags = file_flags
        elif file_flags != flags:
            raise PoolError(
                f"{where.uri}: shards disagree on columns: label/id present = {file_flags}, but {files[0].uri} has "
                f"{flags}. Fix: give every shard of a pool the same columns")
        for i in range(metadata.num_row_groups):
            meta = metadata.row_group(i)
            if meta.num_rows:
                row_groups.append(RowGroup(where, i, offset, meta.num_rows, int(meta.total_byte_size)))
                offset += meta.num_rows
    if offset == 0:
        raise PoolError(f"pool {source} has no rows. Fix: point it at Parquet files that hold samples")
    source_str = _resolved(location(source)).uri if isinstance(source, (str, Path)) else _common_source(files)
    info = PoolInfo(source_str, tuple(files), offset, flags[0], flags[1], tuple(row_groups), tuple(footers))
    if info.has_id_column:
        _check_unique(info, _read_column(info, ID))
    return info


def _check_unique(info: PoolInfo, ids: np.ndarray) -> None:
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1]
        raise PoolError(f"pool {info.source}: column 'id' has {len(dup)} duplicated value(s), e.g. {dup[:5].tolist()}. "
                        "Fix: ids must be unique; drop the 'id' column to use row indices as ids")


def _as_info(pool: PoolInfo | str | Path | Sequence[str | Path]) -> PoolInfo:
    return pool if isinstance(pool, PoolInfo) else inspect_pool(pool)


def _read_column(info: PoolInfo, name: str) -> np.ndarray:
    """One integer column of the whole pool as int64 [num_rows], read on the driver (nulls are an error)."""
    parts = []
    for where in info.locations:
        col = _read_file(where, lambda pf: pf.read(columns=[name]).column(name), info.footer(where))
        if col.null_count:
            raise PoolError(f"{where.uri}: column '{name}' has {col.null_count} missing value(s). "
                            "Fix: fill or drop those rows")
        parts.append(col.to_numpy().astype(np.int64, copy=False))
    out = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if len(out) != info.num_rows:
        raise PoolError(f"pool {info.source} changed since it was inspected ({len(out)} rows, expected "
                        f"{info.num_rows}). Fix: inspect it again")
    return out


def read_ids(pool: PoolInfo | str | Path) -> np.ndarray:
    """All ids of the pool, int64 [num_rows], in row order (the id column, else row indices)."""
    info = _as_info(pool)
    return _read_column(info, ID) if info.has_id_column else np.arange(info.num_rows, dtype=np.int64)


def read_labels(pool: PoolInfo | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [num_rows], labels int64 [num_rows]) in row order, read on the driver without images."""
    info = _as_info(pool)
    if not info.has_label:
        raise PoolError(f"pool {info.source} has no 'label' column. Fix: use a labelled pool (a 'label' integer "
                        "column) for training/evaluation, or only read its ids/images")
    return read_ids(info), _read_column(info, LABEL)


def _rows_of(info: PoolInfo, ids) -> np.ndarray:
    """Sorted unique global row indices of ``ids``; PoolError listing ids that are not in the pool."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise PoolError(f"ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    ids = np.unique(ids.astype(np.int64))
    if info.has_id_column:
        all_ids = _read_column(info, ID)
        order = np.argsort(all_ids, kind="stable")
        pos = np.clip(np.searchsorted(all_ids, ids, sorter=order), 0, max(len(order) - 1, 0))
        found = (all_ids[order[pos]] == ids) if len(order) else np.zeros(len(ids), bool)
        rows = np.sort(order[pos[found]])
    else:
        found = (ids >= 0) & (ids < info.num_rows)
        rows = ids[found]
    if not found.all():
        missing = ids[~found]
        valid = "its 'id' column" if info.has_id_column else f"row indices 0..{info.num_rows - 1}"
        raise PoolError(f"{len(missing)} requested id(s) are not in pool {info.source}, e.g. {missing[:10].tolist()}. "
                        f"Fix: request ids the pool has ({valid}; see read_ids)")
    return rows


def select_row_groups(pool: PoolInfo, ids: np.ndarray | None = None) -> list[tuple[RowGroup, np.ndarray | None]]:
    """The row groups a read needs: ``(row_group, positions)`` in row-group order.

    ``positions`` (int64, sorted, within the group) are the rows to keep, None for all of them.
    Row groups that hold none of ``ids`` are left out, so they are never read.
    """
    if ids is None:
        return [(rg, None) for rg in pool.row_groups]
    rows = _rows_of(pool, ids)
    plan = []
    for rg in pool.row_groups:
        lo, hi = np.searchsorted(rows, [rg.offset, rg.offset + rg.num_rows])
        if hi > lo:
            plan.append((rg, rows[lo:hi] - rg.offset))
    return plan


def _read_row_group(
    rg: RowGroup, positions: np.ndarray | None, columns: tuple[str, ...], has_id: bool
) -> list[pa.Table]:
    """Read task body: one row group -> one Arrow table with ``columns`` (id int64, image binary, label int64).

    The file is reopened here from ``rg.file`` (on a worker: its filesystem rebuilt from the pickled store
    settings, credentials from the worker's environment); a store failure is a `StorageError` naming it.
    """
    want = [c for c in columns if c != ID or has_id]
    table = _read_file(rg.file, lambda pf: pf.read_row_group(rg.index, columns=want))
    if table.num_rows != rg.num_rows:
        raise PoolError(f"{rg.path}: row group {rg.index} has {table.num_rows} rows, expected {rg.num_rows}; the file "
                        "changed since the pool was inspected. Fix: inspect the pool again")
    if positions is not None:
        table = table.take(pa.array(positions))
    out = {}
    for name in columns:
        if name == ID and not has_id:
            rows = np.arange(rg.num_rows) if positions is None else positions
            out[ID] = pa.array(rows + rg.offset, pa.int64())
        elif name in (ID, LABEL):
            out[name] = table.column(name).cast(pa.int64())
        elif name == IMAGE:
            out[name] = table.column(name).cast(pa.binary())
        else:
            out[name] = table.column(name)
    return [pa.table(out)]


def _carried_read(*args) -> list[pa.Table]:
    """`_read_row_group` in a read task, its errors (a `StorageError`, a `PoolError`) carried to the driver as
    `ray_dal.errors.carry` carries a UDF's."""
    try:
        return _read_row_group(*args)
    except Exception as error:
        raise _CarriedRead(error) from error


class _CarriedRead(UserCodeException):
    """A read task's error on its way to the driver, where it unpickles as `ray_dal.errors.CarriedError`.

    Not that class itself: ray_dal.errors imports torch (and this module), and importing torch in a read
    task that fails is importing it where Ray Data cancels tasks; a cancelled import leaves the worker
    process with half a torch for every later task.
    """

    def __init__(self, error: BaseException):
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")

    def __reduce__(self):
        parts = (type(self.error), self.error.args, dict(vars(self.error)))
        try:
            pickle.dumps(parts)
        except Exception:  # as CarriedError.wrap: an unpicklable error still arrives as its type name and message
            parts = (RuntimeError, (f"{type(self.error).__name__}: {self.error}",), {})
        return (_as_carried, parts)


def _as_carried(cls: type, args: tuple, state: dict) -> BaseException:
    from ray_dal.errors import _rebuild  # on the driver, which has torch

    return _rebuild(cls, args, state)


class _RowGroupDatasource(Datasource):
    """One read task per planned row group, in row-group order."""

    def __init__(self, plan: list[tuple[RowGroup, np.ndarray | None]], columns: tuple[str, ...], has_id: bool,
                 schema: pa.Schema):
        super().__init__()
        self._plan, self._columns, self._has_id, self._schema = plan, columns, has_id, schema

    @staticmethod
    def _rows_and_bytes(rg: RowGroup, positions: np.ndarray | None) -> tuple[int, int]:
        n = rg.num_rows if positions is None else len(positions)
        return n, int(rg.size_bytes * n / rg.num_rows)

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._rows_and_bytes(rg, pos)[1] for rg, pos in self._plan)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        # One task per planned row group whatever ``parallelism`` asks: a row group is the unit of reading.
        tasks = []
        for rg, positions in self._plan:
            num_rows, size = self._rows_and_bytes(rg, positions)
            meta = BlockMetadata(num_rows=num_rows, size_bytes=size, exec_stats=None, input_files=(rg.path,))
            fn = functools.partial(_carried_read, rg, positions, self._columns, self._has_id)
            tasks.append(ReadTask(fn, meta, schema=self._schema, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadPool"


def _file_schema(info: PoolInfo, where: Location) -> pa.Schema:
    """The Arrow schema of the pool's file ``where`` (from its footer)."""
    return _read_file(where, lambda pf: pf.schema_arrow, info.footer(where))


def _output_schema(file_schema: pa.Schema, columns: tuple[str, ...]) -> pa.Schema:
    types = {ID: pa.int64(), IMAGE: pa.binary(), LABEL: pa.int64()}
    return pa.schema([(c, types.get(c) or file_schema.field(c).type) for c in columns])


def read_pool(
    pool: PoolInfo | str | Path,
    columns: Sequence[str] = (ID, IMAGE, LABEL),
    ids: np.ndarray | None = None,
    num_cpus: float = READ_CPUS,
    preserve_order: bool = True,
) -> ray.data.Dataset:
    """Stream a pool as a Ray Dataset: int64 ``id``, binary ``image``, int64 ``label`` (and other file columns).

    ``label`` is left out when the pool has none. ``ids`` given: only those rows (each once, in pool
    order), and row groups holding none of them are not read. One read task per row group, each
    reserving ``num_cpus`` (small, so reads keep running beside actors that hold most CPUs).
    ``preserve_order`` keeps row-group order (deterministic); turn it off where order does not matter.
    """
    # A custom Datasource rather than from_items + map: Ray Data then knows every task's row count and
    # size up front (memory planning, ds.count() without reading, ds.schema() without executing), and
    # the read is a plain Read operator whose resources are set here, one task per planned row group.
    info = _as_info(pool)
    plan = select_row_groups(info, ids)
    schema_file = plan[0][0].file if plan else info.locations[0]  # only files the read needs are opened
    columns = tuple(c for c in columns if c != LABEL or info.has_label)
    file_schema = _file_schema(info, schema_file)
    file_columns = set(file_schema.names) | {ID}
    unknown = [c for c in columns if c not in file_columns]
    if unknown or len(set(columns)) != len(columns) or not columns:
        raise PoolError(f"read_pool columns {list(columns)} are invalid for pool {info.source}: unknown {unknown}; "
                        f"choose distinct names from {sorted(file_columns)}")
    source = _RowGroupDatasource(plan, columns, info.has_id_column, _output_schema(file_schema, columns))
    ds = ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=max(len(plan), 1))
    ds.context.execution_options.preserve_order = preserve_order
    return ds


def read_labeled(
    pool: PoolInfo | str | Path, ids: np.ndarray, labels: np.ndarray, num_cpus: float = READ_CPUS
) -> ray.data.Dataset:
    """`read_pool` of the rows ``ids`` with their ``label`` taken from ``labels`` (aligned with ``ids``), not
    from the pool: labels given by people, or the dataset's own passed explicitly. Columns id, image, label."""
    ids, labels = aligned_labels(ids, labels)
    order = np.argsort(ids)
    return read_pool(pool, columns=(ID, IMAGE), ids=ids, num_cpus=num_cpus).map_batches(
        _attach_labels, batch_format="pyarrow", num_cpus=num_cpus,
        fn_kwargs={"ids": ids[order], "labels": labels[order]})


def aligned_labels(ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)`` as int64, checked to be 1-D arrays of one length (``labels[i]`` is ``ids[i]``'s)."""
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels, np.int64)
    if ids.shape != labels.shape or ids.ndim != 1:
        raise ValueError(f"ids and labels must be 1-D arrays of one length, got {ids.shape} and {labels.shape}")
    return ids, labels


def _attach_labels(batch: pa.Table, ids: np.ndarray, labels: np.ndarray) -> pa.Table:
    rows = np.searchsorted(ids, batch.column(ID).to_numpy())
    return batch.append_column(LABEL, pa.array(labels[rows], pa.int64()))


def read_rows(pool: PoolInfo | str | Path, ids: np.ndarray, columns: Sequence[str] = (ID, IMAGE)) -> pa.Table:
    """The rows ``ids`` of the pool, read here (on the driver: for a query's few hundred images, not a pool),
    in the order of ``ids``; ``columns`` as `read_pool`'s. PoolError for ids the pool does not hold."""
    info = _as_info(pool)
    ids = np.asarray(ids, np.int64)
    columns = tuple(dict.fromkeys((ID, *columns)))
    parts = [t for rg, positions in select_row_groups(info, ids)
             for t in _read_row_group(rg, positions, columns, info.has_id_column)]
    empty = lambda: _output_schema(_file_schema(info, info.locations[0]), columns).empty_table()  # noqa: E731
    table = pa.concat_tables(parts) if parts else empty()
    found = table.column(ID).to_numpy()
    return table.take(pa.array(np.argsort(found)[np.searchsorted(np.sort(found), ids)]))
