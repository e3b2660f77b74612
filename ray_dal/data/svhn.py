"""SVHN's benchmark split in torchvision's layout (``train_32x32.mat``, ``test_32x32.mat``) as Parquet pools.

The MATLAB files hold ``X`` uint8 [32, 32, 3, N] and ``y`` [N, 1] with labels 1..10, 10 meaning the
digit 0; like torchvision, label 10 becomes 0. `LAYOUT` finds the two files in ``data_dir`` and
converts them once (see `ray_dal.data.convert`): images as lossless PNG, columns id (the row index),
image, label. The ``extra`` split is not used (the paper does not). `download` fetches both files with
torchvision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_dal.data.convert import Layout, convert_arrays
from ray_dal.data.pools import PoolError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def find_mat_files(data_dir: Path) -> Path | None:
    """``data_dir`` when it holds both .mat files."""
    return data_dir if all((data_dir / f).is_file() for f in FILES.values()) else None


def convert_mat_files(folder: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``train_32x32.mat`` and ``test_32x32.mat`` as ``out_dir/{train,test}.parquet`` (each once)."""
    return convert_arrays(out_dir, lambda split: load_mat(folder / FILES[split]), ids=True)


def load_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN .mat file -> (images uint8 [N, 32, 32, 3], labels int64 [N] in 0..9)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)  # MATLAB arrays only: nothing in the file can run code
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    except Exception as e:
        raise PoolError(f"cannot read SVHN file {path} ({type(e).__name__}: {e}). Fix: delete it and download it "
                        "again (torchvision.datasets.SVHN)") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != y.size:
        raise PoolError(f"{path}: X is {x.dtype} {list(x.shape)} and y has {y.size} labels, but SVHN's X is uint8 "
                        "[32, 32, 3, N] with N labels. Fix: download the file again")
    labels = y.astype(np.int64)
    labels[labels == 10] = 0
    bad = np.unique(labels[(labels < 0) | (labels > 9)])
    if bad.size:
        raise PoolError(f"{path}: labels {bad[:10].tolist()} are not SVHN's 1..10. Fix: download the file again")
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels


def download(data_dir: Path) -> None:
    from torchvision.datasets import SVHN

    for split in FILES:
        SVHN(root=str(data_dir), split=split, download=True)


LAYOUT = Layout("torchvision's SVHN files train_32x32.mat and test_32x32.mat", find_mat_files, convert_mat_files)
