"""The datasets the experiments run on: classes, image size, statistics, and where their pools come from.

=============  =======  ==========  ==========================================================
name           classes  image size  data_dir may hold (besides train.parquet + test.parquet)
=============  =======  ==========  ==========================================================
``cifar10``    10       32 x 32     torchvision's ``cifar-10-batches-py``
``svhn``       10       32 x 32     torchvision's ``train_32x32.mat`` + ``test_32x32.mat``
``caltech101`` 101      299 x 299   torchvision's ``caltech101/101_ObjectCategories``
=============  =======  ==========  ==========================================================

Every dataset also takes an ImageFolder copy (`ray_dal.data.image_folder`) and, when ``data_dir``
holds none of these, downloads with torchvision (online machines only; offline it fails at once with
a `PoolError` naming the folder). Layouts are converted once to ``data_dir/ray_dal_parquet``
(`ray_dal.data.convert`). Statistics: CIFAR-10's and SVHN's training-set means/stds (as BADGE's code
uses them); Caltech101, whose images vary in size and are resized (the paper's 299 x 299, an
ImageNet-style ResNet18 trained from scratch), uses ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray_dal.data import cifar10, image_folder, svhn
from ray_dal.data.convert import Layout, resolve_layouts
from ray_dal.data.transforms import CIFAR10_MEAN, CIFAR10_STD, ImageTransform

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    """One dataset: its facts, its on-disk layouts (before the ImageFolder copy every dataset takes), its download.

    ``resize``: its images vary in size and are always resized to the image size; otherwise images of
    another size are bad images unless a size is asked for (`transform`).
    """

    name: str
    title: str
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: bool
    layouts: tuple[Layout, ...]
    download: Callable[[Path], None]

    def transform(self, image_size: int | tuple[int, int] | None = None) -> ImageTransform:
        """The preprocessing of this dataset; ``image_size`` (config data.image_size) overrides the size and resizes."""
        size = self.image_size if image_size is None else image_size
        return ImageTransform(size, self.mean, self.std, resize=self.resize or image_size is not None)

    def resolve(self, data_dir: str | Path, download: bool = True) -> tuple[Path, Path]:
        """(train, test) Parquet pool sources under ``data_dir``, converted or downloaded when needed; else PoolError."""
        return resolve_layouts(data_dir, self.title, (*self.layouts, image_folder.IMAGE_FOLDER), self.download,
                               download)


DATASETS = {d.name: d for d in (
    Dataset("cifar10", "CIFAR-10", 10, (32, 32), CIFAR10_MEAN, CIFAR10_STD, False, (cifar10.LAYOUT,),
            cifar10.download),
    Dataset("svhn", "SVHN", 10, (32, 32), SVHN_MEAN, SVHN_STD, False, (svhn.LAYOUT,), svhn.download),
    Dataset("caltech101", "Caltech101", 101, (299, 299), IMAGENET_MEAN, IMAGENET_STD, True,
            (image_folder.CALTECH101,), image_folder.download_caltech101),
)}


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; KeyError listing the names otherwise."""
    if name not in DATASETS:
        raise KeyError(f"dataset {name!r} is not registered; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_cifar10(data_dir: str | Path, download: bool = True) -> tuple[Path, Path]:
    """(train, test) Parquet pool sources for CIFAR-10 under ``data_dir``; PoolError when there is none."""
    return DATASETS["cifar10"].resolve(data_dir, download)
