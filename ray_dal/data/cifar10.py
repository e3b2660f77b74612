"""CIFAR-10 in torchvision's layout (``cifar-10-batches-py``: pickled batches) as Parquet pools.

`LAYOUT` finds the folder (in ``data_dir`` or ``data_dir`` itself) and converts it once (see
`ray_dal.data.convert`): images as lossless PNG, 5,000-row row groups, columns image and label (the id
is the row index). `download` fetches it with torchvision. Batch files are unpickled with numpy arrays
and plain containers only, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ray_dal.data.convert import Layout, convert_arrays
from ray_dal.data.pools import PoolError

BATCHES = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)


def find_batches(data_dir: Path) -> Path | None:
    """The folder holding the six batch files: ``data_dir/cifar-10-batches-py`` or ``data_dir``."""
    for folder in (data_dir / BATCHES, data_dir):
        if all((folder / f).is_file() for f in TRAIN_FILES + TEST_FILES):
            return folder
    return None


def convert_batches(batches: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write the batch files as ``out_dir/train.parquet`` and ``out_dir/test.parquet`` (each once)."""
    return convert_arrays(out_dir, lambda split: _load_split(batches, TRAIN_FILES if split == "train" else TEST_FILES))


def download(data_dir: Path) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(root=str(data_dir), train=True, download=True)


LAYOUT = Layout(f"torchvision's {BATCHES} folder (data_batch_1..5, test_batch)", find_batches, convert_batches)


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


def _load_split(batches: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The batches ``names`` as (images uint8 [N, 32, 32, 3], labels [N])."""
    loaded = [_load_batch(batches / n) for n in names]
    return np.concatenate([d for d, _ in loaded]), np.concatenate([lab for _, lab in loaded])
