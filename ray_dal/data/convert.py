"""Finding a dataset on disk as two Parquet pools (train, test), converting or downloading it when needed.

`resolve_layouts` tries, in order, for a folder ``data_dir``:
  a. ``train.parquet`` and ``test.parquet`` (files, or folders of shards) in ``data_dir``: used as they are;
  b. the same in ``data_dir/ray_dal_parquet``: an earlier conversion, used as it is;
  c. the dataset's on-disk `Layout`s (torchvision's files, an ImageFolder copy), in order: the first one
     found is converted once into (b);
  d. nothing: with ``download=True``, the dataset's download into ``data_dir`` (torchvision's), then (c).
Each converted file is written to a temp name and renamed, so (b) only ever holds complete files and an
interrupted conversion redoes only what is missing. To convert again (e.g. after changing the source
files), delete ``ray_dal_parquet``.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ray_dal.data.pools import ID, IMAGE, LABEL, PoolError

CONVERTED = "ray_dal_parquet"
ROWS_PER_GROUP = 5_000
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, so an unreachable network fails instead of hanging
_TYPES = {ID: pa.int64(), IMAGE: pa.binary(), LABEL: pa.int64(), "path": pa.string()}


@dataclass(frozen=True)
class Layout:
    """One on-disk format of a dataset.

    ``find(data_dir)`` returns the format's source (e.g. the folder holding its files) or None;
    ``convert(source, out_dir)`` writes ``out_dir/train.parquet`` and ``out_dir/test.parquet`` (keeping
    a file that exists) and returns their paths. ``describe`` names the format in error messages.
    """

    describe: str
    find: Callable[[Path], Any]
    convert: Callable[[Any, Path], tuple[Path, Path]]


def parquet_pair(folder: Path) -> tuple[Path, Path] | None:
    """``folder``'s (train.parquet, test.parquet), files or folders of shards, when both exist."""
    train, test = folder / "train.parquet", folder / "test.parquet"
    return (train, test) if train.exists() and test.exists() else None


def resolve_layouts(
    data_dir: str | Path,
    title: str,
    layouts: Sequence[Layout],
    download_fn: Callable[[Path], None],
    download: bool = True,
) -> tuple[Path, Path]:
    """(train, test) Parquet pool sources of dataset ``title`` under ``data_dir`` (steps a-d); PoolError if none."""
    data_dir = Path(data_dir).expanduser().resolve()
    found = parquet_pair(data_dir) or parquet_pair(data_dir / CONVERTED)
    if found:
        return found
    source = _find(layouts, data_dir)
    if source is None:
        if not download:
            raise _not_found(title, data_dir, layouts, "download=False")
        try:
            with download_timeout():
                download_fn(data_dir)
        except Exception as e:
            raise _not_found(title, data_dir, layouts, f"the download failed ({type(e).__name__}: {e})") from None
        source = _find(layouts, data_dir)
        if source is None:
            raise _not_found(title, data_dir, layouts, "the download did not create any of these layouts")
    layout, where = source
    return layout.convert(where, data_dir / CONVERTED)


def _find(layouts: Sequence[Layout], data_dir: Path) -> tuple[Layout, Any] | None:
    if not data_dir.is_dir():
        return None
    for layout in layouts:
        where = layout.find(data_dir)
        if where is not None:
            return layout, where
    return None


def _not_found(title: str, data_dir: Path, layouts: Sequence[Layout], why: str) -> PoolError:
    accepted = "".join(f", or {layout.describe}" for layout in layouts)
    return PoolError(
        f"{title} was not found in {data_dir} and {why}. Fix: point --data-dir (config data.data_dir) at a "
        f"folder holding train.parquet and test.parquet (columns image, label, optional id){accepted}; or run "
        "once where the internet is reachable to download it")


@contextlib.contextmanager
def download_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Give every socket operation a timeout (torchvision's urlopen has none of its own) while downloading."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def array_chunks(images: np.ndarray, labels: np.ndarray, ids: np.ndarray | None = None,
                 rows: int = ROWS_PER_GROUP) -> Iterator[dict[str, Any]]:
    """Rows of uint8 images [N, H, W, 3] (as PNG) and labels, ``rows`` at a time, for `write_pool`."""
    for start in range(0, len(images), rows):
        part = slice(start, start + rows)
        chunk = {} if ids is None else {ID: ids[part]}
        yield {**chunk, IMAGE: [encode_png(im) for im in images[part]], LABEL: labels[part]}


def convert_arrays(out_dir: Path, load: Callable[[str], tuple[np.ndarray, np.ndarray]],
                   ids: bool = False) -> tuple[Path, Path]:
    """``out_dir/{train,test}.parquet`` from ``load(split)`` -> (uint8 images [N, H, W, 3], labels [N]), each file
    written once (``load`` runs only for a missing one); ``ids`` also writes the row index as an id column."""
    paths = []
    for split in ("train", "test"):
        out = out_dir / f"{split}.parquet"
        if not out.is_file():
            images, labels = load(split)
            write_pool(out, array_chunks(images, labels, np.arange(len(labels), dtype=np.int64) if ids else None))
        paths.append(out)
    return paths[0], paths[1]


def write_pool(out: Path, chunks: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``chunks`` (column name -> values; one row group each) as the Parquet file ``out``, once.

    An existing ``out`` is kept as it is. The file appears complete or not at all (temp file, then rename).
    """
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = None
    try:
        for chunk in chunks:
            table = pa.table({name: pa.array(values, _TYPES.get(name)) for name, values in chunk.items()})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, use_dictionary=[LABEL] if LABEL in chunk else False)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
        if writer is None:
            raise PoolError(f"nothing to write to {out}: the source holds no images. Fix: check the source files")
        writer.close()
        os.replace(tmp, out)
    finally:
        if writer is not None and writer.is_open:
            writer.close()
        tmp.unlink(missing_ok=True)
    return out
