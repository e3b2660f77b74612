"""Finding CIFAR-10 on disk as two pools (train, test), converting or downloading it when needed.

Accepted layouts of ``data_dir``, tried in order:
  a. ``train.parquet`` and ``test.parquet`` (columns image, label): used as they are;
  b. ``ray_dal_parquet/{train,test}.parquet``: an earlier conversion of (c), used as it is;
  c. torchvision's ``cifar-10-batches-py`` folder (in ``data_dir`` or ``data_dir`` itself): converted
     once to (b), images as lossless PNG, 5,000-row row groups;
  d. nothing: with ``download=True``, torchvision downloads (c), then it is converted.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ray_dal.data.pools import PoolError

BATCHES = "cifar-10-batches-py"
CONVERTED = "ray_dal_parquet"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
ROWS_PER_GROUP = 5_000
DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, so an unreachable network fails instead of hanging


def resolve_cifar10(data_dir: str | Path, download: bool = True) -> tuple[Path, Path]:
    """(train, test) Parquet pool sources for CIFAR-10 under ``data_dir``; PoolError when there is none."""
    data_dir = Path(data_dir).expanduser().resolve()
    for folder in (data_dir, data_dir / CONVERTED):
        if (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
            return folder / "train.parquet", folder / "test.parquet"
    batches = _find_batches(data_dir)
    if batches is None:
        if not download:
            raise _not_found(data_dir, "download=False")
        try:
            _download(data_dir)
        except Exception as e:
            raise _not_found(data_dir, f"the download failed ({type(e).__name__}: {e})") from None
        batches = _find_batches(data_dir)
        if batches is None:
            raise _not_found(data_dir, f"the download did not create {data_dir / BATCHES}")
    out = data_dir / CONVERTED
    return _convert(batches, TRAIN_FILES, out / "train.parquet"), _convert(batches, TEST_FILES, out / "test.parquet")


def _find_batches(data_dir: Path) -> Path | None:
    for folder in (data_dir / BATCHES, data_dir):
        if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
            return folder
    return None


def _not_found(data_dir: Path, why: str) -> PoolError:
    return PoolError(
        f"CIFAR-10 was not found in {data_dir} and {why}. Fix: point --data-dir (config data.data_dir) at a "
        f"folder holding train.parquet and test.parquet, or torchvision's {BATCHES} folder (data_batch_1..5, "
        "test_batch), or run once where the internet is reachable to download it")


def _download(data_dir: Path) -> None:
    from torchvision.datasets import CIFAR10

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen has no timeout of its own
    try:
        CIFAR10(root=str(data_dir), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a crafted batch file cannot run code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"),
                ("_codecs", "encode")}  # how Python 3 writes bytes at pickle protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch file")
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One torchvision/CIFAR pickle -> (images uint8 [N, 32, 32, 3], labels int64 [N])."""
    try:
        with path.open("rb") as f:
            entry = _ArrayUnpickler(f, encoding="latin1").load()
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as e:
        raise PoolError(f"cannot read CIFAR-10 batch file {path} ({type(e).__name__}: {e}). Fix: delete the "
                        f"{BATCHES} folder and download it again") from None
    if len(labels) != len(data):
        raise PoolError(f"{path}: {len(data)} images but {len(labels)} labels. Fix: download the batch files again")
    return data, labels


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _convert(batches: Path, names: tuple[str, ...], out: Path) -> Path:
    """Write the batches ``names`` as one Parquet pool at ``out`` (once; temp file then rename)."""
    if out.is_file():
        return out
    loaded = [_load_batch(batches / n) for n in names]
    images = np.concatenate([d for d, _ in loaded])
    labels = np.concatenate([lab for _, lab in loaded])
    table = pa.table({"image": pa.array([_png(im) for im in images], pa.binary()), "label": pa.array(labels)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=ROWS_PER_GROUP, use_dictionary=["label"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
