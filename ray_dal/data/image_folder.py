"""Images in class folders (an ImageFolder copy, Caltech101's torchvision layout) as Parquet pools.

Layouts of a root folder:
  - ``<root>/train/<class>/<image>`` and ``<root>/test/<class>/<image>``: the split as given (the test
    classes must be train classes);
  - ``<root>/<class>/<image>``: split per class with a seeded generator, `TEST_FRACTION` (20%) of each
    class to the test pool (rounded), the rest to the training pool, as the paper does for Caltech101;
  - Caltech101: ``caltech101/101_ObjectCategories/<class>/*.jpg`` (torchvision's, in ``data_dir``) or
    ``101_ObjectCategories`` itself, split as above; BACKGROUND_Google is not a class (as in torchvision).
Classes are the sorted folder names (label = position, as torchvision's ImageFolder); images are the
files with an image extension, sorted by name; hidden entries and ``ray_dal_parquet`` are ignored. A
row's id is its position in the sorted (class, file) list of its root (of each of train/ and test/ for a
given split), so train and test ids of a seeded split are disjoint. The files' bytes are stored as they
are, with their ``path`` relative to the root: decoding converts to RGB (grayscale images included) and
resizes to the dataset's image size (`ray_dal.data.transforms`). Conversion happens once
(`ray_dal.data.convert`), 1,000-row row groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ray_dal.data.convert import CONVERTED, Layout, write_pool
from ray_dal.data.pools import ID, IMAGE, LABEL, PoolError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TEST_FRACTION = 0.2
SPLIT_SEED = 0
ROWS_PER_GROUP = 1_000
CALTECH_FOLDERS = ("caltech101/101_ObjectCategories", "101_ObjectCategories")
CALTECH_EXCLUDED = ("BACKGROUND_Google",)


@dataclass(frozen=True)
class ClassFolders:
    """A folder of class folders; ``excluded`` names folders that are not classes."""

    root: Path
    excluded: tuple[str, ...] = ()

    def classes(self) -> list[str]:
        return sorted(p.name for p in _entries(self.root) if p.is_dir() and p.name not in self.excluded)

    def images(self, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray]:
        """Every image file (sorted by class, then name) and its label (the position of its class in ``classes``)."""
        own = self.classes()
        classes = own if classes is None else classes
        paths, labels = [], []
        for name in own:
            if name not in classes:
                raise PoolError(f"{self.root / name} is not a class of the training folder (classes: "
                                f"{classes[:10]}...). Fix: give train/ and test/ the same class folders")
            files = sorted(p for p in _entries(self.root / name) if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise PoolError(f"class folder {self.root / name} holds no image ({', '.join(IMAGE_EXTENSIONS)}). "
                                "Fix: add its images or remove the folder")
            paths += files
            labels += [classes.index(name)] * len(files)
        return paths, np.asarray(labels, dtype=np.int64)


@dataclass(frozen=True)
class FolderSource:
    """What `find_image_folder` / `find_caltech101` found: one folder to split, or a given train/test split."""

    train: ClassFolders
    test: ClassFolders | None = None  # None: split ``train`` per class


def _entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".") and p.name != CONVERTED]


def _holds_images(folders: ClassFolders) -> bool:
    return any(p.suffix.lower() in IMAGE_EXTENSIONS for c in folders.classes() for p in (folders.root / c).iterdir())


def find_image_folder(data_dir: Path) -> FolderSource | None:
    """``data_dir`` as ``train/<class>`` + ``test/<class>``, or as ``<class>`` folders, when one holds images."""
    train, test = ClassFolders(data_dir / "train"), ClassFolders(data_dir / "test")
    if train.root.is_dir() and test.root.is_dir() and _holds_images(train):
        return FolderSource(train, test)
    whole = ClassFolders(data_dir)
    return FolderSource(whole) if _holds_images(whole) else None


def find_caltech101(data_dir: Path) -> FolderSource | None:
    """torchvision's ``caltech101/101_ObjectCategories`` in ``data_dir`` (or ``101_ObjectCategories``)."""
    for sub in CALTECH_FOLDERS:
        if (data_dir / sub).is_dir():
            return FolderSource(ClassFolders(data_dir / sub, CALTECH_EXCLUDED))
    return None


def split_per_class(labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """bool [N]: True for the seeded ``fraction`` of each class (round(fraction x class size)) that goes to test."""
    labels = np.asarray(labels)
    test = np.zeros(labels.size, dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n_test = int(np.floor(fraction * rows.size + 0.5))
        test[np.random.default_rng([seed, int(c)]).choice(rows, n_test, replace=False)] = True
    return test


def convert_folders(source: FolderSource, out_dir: Path) -> tuple[Path, Path]:
    """Write ``source`` as ``out_dir/{train,test}.parquet`` (each once)."""
    paths, labels = source.train.images()
    if source.test is None:
        is_test = split_per_class(labels)
        parts = {"train": (source.train, paths, labels, ~is_test), "test": (source.train, paths, labels, is_test)}
    else:
        test_paths, test_labels = source.test.images(source.train.classes())
        parts = {"train": (source.train, paths, labels, np.ones(len(paths), bool)),
                 "test": (source.test, test_paths, test_labels, np.ones(len(test_paths), bool))}
    return tuple(write_pool(out_dir / f"{split}.parquet", _rows(*part)) for split, part in parts.items())


def _rows(folders: ClassFolders, paths: list[Path], labels: np.ndarray, chosen: np.ndarray) -> Iterator[dict[str, Any]]:
    ids = np.flatnonzero(chosen)
    for start in range(0, ids.size, ROWS_PER_GROUP):
        part = ids[start:start + ROWS_PER_GROUP]
        yield {ID: part, IMAGE: [read_image_file(paths[i]) for i in part], LABEL: labels[part],
               "path": [str(paths[i].relative_to(folders.root)) for i in part]}


def read_image_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise PoolError(f"cannot read image file {path} ({type(e).__name__}: {e}). Fix: check its permissions, "
                        "or remove it") from None


def download_caltech101(data_dir: Path) -> None:
    from torchvision.datasets import Caltech101

    Caltech101(root=str(data_dir), download=True)


IMAGE_FOLDER = Layout("an ImageFolder copy (<class>/<image> folders, split 80/20 per class, or train/<class>/ and "
                      "test/<class>/)", find_image_folder, convert_folders)
CALTECH101 = Layout("torchvision's caltech101/101_ObjectCategories/<class>/*.jpg", find_caltech101, convert_folders)
