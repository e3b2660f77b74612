"""Labels files: the (id, label) rows people gave, as Parquet or CSV.

A labels file has columns ``id`` (integer sample id of the pool) and ``label``: a class index, or a
class name when the run has class names (``data.classes``). For a pool made from a folder of image files
(`ray_dal.data.image_files`), ``path`` (relative to that folder) may stand in for ``id``. The same id may
appear twice only with the same label. `read_label_file` reads one as it is; `encode_labels` turns its labels into class indices
and checks them; `write_label_file` writes one atomically (the format follows the file name). A labels
file is a local path or a URI (``file://``, ``s3://``, ...; `ray_dal.storage.location`): a store that
cannot be reached is a `StorageError` naming the URI and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ray_dal.config import ConfigError
from ray_dal.data.pools import PoolInfo, read_ids
from ray_dal.storage import Location, location

FORMATS = (".parquet", ".csv")


def label_file_format(path: str | Path | Location) -> str:
    """'.parquet' or '.csv', from the file name; `ConfigError` otherwise."""
    suffix = Path(location(path).name).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"labels file {path} must end in .parquet or .csv (the format follows the name)")
    return suffix


def read_label_file(path: str | Path | Location) -> tuple[np.ndarray, np.ndarray]:
    """(keys [N], labels [N]) as the file holds them; N >= 1, no missing values.

    ``keys``: int64 ids, or str objects when the file names images by ``path`` instead of ``id``;
    ``labels``: int64 or str objects. Raises `ConfigError` naming the file: unreadable, without
    ``id`` (or ``path``) and ``label`` columns, empty, missing values, or non-integer ids.
    """
    suffix = label_file_format(path)
    where = location(path)
    if not where.is_file():
        raise ConfigError(f"labels file {path} does not exist")
    data = pa.BufferReader(where.read_bytes())  # a labels file is small: one GET, then parsed in memory
    try:
        if suffix == ".csv":
            types = {"label": pa.string(), "path": pa.string()}
            options = pacsv.ConvertOptions(column_types=types, strings_can_be_null=True)  # "" is a missing label
            table = pacsv.read_csv(data, convert_options=options)
        else:
            table = pq.read_table(data)
    except (pa.ArrowInvalid, OSError) as error:
        raise ConfigError(f"cannot read labels file {path} as {suffix[1:].upper()}: {error}") from None
    key = "path" if "path" in table.column_names and "id" not in table.column_names else "id"
    missing = [c for c in (key, "label") if c not in table.column_names]
    if missing:
        raise ConfigError(f"labels file {path} needs columns id (or path) and label (a header row in a CSV); it "
                          f"lacks {missing} and has {table.column_names}")
    if table.num_rows == 0:
        raise ConfigError(f"labels file {path} is empty: it needs at least one (id, label) row")
    for name in (key, "label"):
        if table[name].null_count:
            raise ConfigError(f"labels file {path} has {table[name].null_count} row(s) without a {name}; every row "
                              "needs both")
    if key == "path":
        ids = np.asarray(table["path"].cast(pa.string()).to_pylist(), dtype=object)
    elif not pa.types.is_integer(table["id"].type):
        raise ConfigError(f"labels file {path}: column id must hold integer sample ids, not {table['id'].type}")
    else:
        ids = table["id"].to_numpy().astype(np.int64)
    label_type = table["label"].type
    if pa.types.is_integer(label_type):
        return ids, table["label"].to_numpy().astype(np.int64)
    if pa.types.is_string(label_type) or pa.types.is_large_string(label_type):
        return ids, np.asarray(table["label"].to_pylist(), dtype=object)
    raise ConfigError(f"labels file {path}: column label must hold class indices or class names, not {label_type}")


def class_names(classes: Sequence[str] | None, num_classes: int) -> list[str]:
    """The run's class names: ``classes``, or "0".."K-1" when it has none."""
    return list(classes) if classes is not None else [str(i) for i in range(num_classes)]


def encode_labels(
    path: str | Path, ids: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, int64 class indices) of a labels file's rows.

    A label is a class index in [0, num_classes), or one of ``classes`` (names win over a digit string
    that is also an index). Raises `ConfigError` naming the file: an id listed twice with different
    labels, an index out of range, an unknown name.
    """
    if labels.dtype == object:
        index = {name: i for i, name in enumerate(classes or ())}
        index.update({str(i): i for i in range(num_classes) if str(i) not in index})
        unknown = sorted({str(v) for v in labels if str(v).strip() not in index})
        if unknown:
            known = f"the run's classes {list(classes)}" if classes else f"class indices 0..{num_classes - 1}"
            raise ConfigError(f"labels file {path} has label(s) {unknown[:10]} that are not {known}. Fix: correct "
                              "them, or start a new run with --classes naming every class")
        labels = np.asarray([index[str(v).strip()] for v in labels], np.int64)
    bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])
    if bad.size:
        raise ConfigError(f"labels file {path} has labels {bad[:10].tolist()} outside [0, --num-classes = "
                          f"{num_classes})")
    order = np.lexsort((labels, ids))
    ids, labels = ids[order], labels[order]
    first = np.ones(ids.size, bool)
    first[1:] = ids[1:] != ids[:-1]
    clash = np.unique(ids[1:][(~first[1:]) & (labels[1:] != labels[:-1])])
    if clash.size:
        raise ConfigError(f"labels file {path} gives {clash.size} id(s) two different labels, e.g. "
                          f"{clash[:10].tolist()}. Fix: keep one label per id")
    return ids[first], labels[first]


def load_labels(
    path: str | Path, pool: PoolInfo, classes: Sequence[str] | None, num_classes: int, flag: str
) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids, int64 labels) of the labels file ``path`` (given as ``flag``), checked against
    ``pool``: `read_label_file`, `encode_labels`, and every id (or path) must be one of the pool's."""
    keys, raw = read_label_file(path)
    ids = keys if keys.dtype != object else _ids_of_paths(path, keys, pool, flag)
    ids, labels = encode_labels(path, ids, raw, classes, num_classes)
    absent = np.setdiff1d(ids, read_ids(pool))
    if absent.size:
        raise ConfigError(f"{flag} {path} has {absent.size} id(s) that pool {pool.source} does not hold, e.g. "
                          f"{absent[:10].tolist()}. Fix: pass the pool these samples were labeled from, or drop them")
    return ids, labels


def _ids_of_paths(path: str | Path, paths: np.ndarray, pool: PoolInfo, flag: str) -> np.ndarray:
    """The pool ids of image ``paths`` (the pool's ``path`` column); `ConfigError` for unknown paths."""
    columns = [_path_column(f) for f in pool.locations]
    columns = [c for c in columns if c is not None]
    if len(columns) != len(pool.locations):
        raise ConfigError(f"{flag} {path} names images by path, but pool {pool.source} has no path column. Fix: "
                          "give ids (column id) instead")
    index = dict(zip((p for c in columns for p in c.to_pylist()), read_ids(pool).tolist()))
    unknown = sorted({p for p in paths if p not in index})
    if unknown:
        raise ConfigError(f"{flag} {path} has {len(unknown)} path(s) that pool {pool.source} does not hold, e.g. "
                          f"{unknown[:5]}. Fix: paths are relative to the image folder, with '/' separators")
    return np.asarray([index[p] for p in paths], np.int64)


def _path_column(where: Location) -> pa.ChunkedArray | None:
    """The ``path`` column of one pool file (read by range), None when it has none."""
    with where.errors("reading"), where.open_input() as f:
        pf = pq.ParquetFile(f)
        return pf.read(columns=["path"])["path"] if "path" in pf.schema_arrow.names else None


def write_label_file(path: str | Path | Location, keys: np.ndarray, labels: Sequence,
                     key: str = "id") -> Path | Location:
    """Write (``key``, label) rows to ``path`` (.parquet or .csv) atomically: a temp file, then a rename on disk
    (returns the `Path`); one PUT for a URI in an object store (returns its `Location`).

    ``key`` "id" (int64 ``keys``) or "path" (str ``keys``); labels are class indices or names.
    """
    suffix = label_file_format(path)
    labels = np.asarray(labels)
    label_array = pa.array(labels.tolist(), pa.string() if labels.dtype.kind in "OUS" else pa.int64())
    key_array = pa.array(np.asarray(keys, np.int64)) if key == "id" else pa.array(list(keys), pa.string())
    table = pa.table({key: key_array, "label": label_array})
    where = location(path)
    if not where.is_local:
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink) if suffix == ".csv" else pq.write_table(table, sink)
        where.write_bytes(sink.getvalue().to_pybytes())
        return where
    path = where.local
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if suffix == ".csv":
            pacsv.write_csv(table, tmp)
        else:
            pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
