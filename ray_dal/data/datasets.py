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
(`ray_dal.data.convert`). A ``data_dir`` in object storage (``s3://bucket/prefix``, any URI of
`ray_dal.storage.location`) must hold the Parquet pair itself (in it or in its ``ray_dal_parquet``):
conversions and downloads happen only on local disk. Statistics: CIFAR-10's and SVHN's training-set
means/stds (as BADGE's code uses them); Caltech101, whose images vary in size and are resized (the
paper's 299 x 299, an ImageNet-style ResNet18 trained from scratch), uses ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ray_dal.data import cifar10, image_folder, svhn
from ray_dal.data.convert import CONVERTED, Layout, resolve_layouts
from ray_dal.data.pools import PoolError
from ray_dal.data.transforms import CIFAR10_MEAN, CIFAR10_STD, ImageTransform
from ray_dal.storage import Location, location

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

    def resolve(self, data_dir: str | Path, download: bool = True) -> tuple[Path | str, Path | str]:
        """(train, test) Parquet pool sources under ``data_dir``, converted or downloaded when needed; else PoolError.

        A URI ``data_dir``: its (train, test) URIs as they are, or PoolError saying to convert locally first.
        """
        where = location(data_dir)
        if not where.is_local:
            return remote_parquet_pair(where, self.title)
        return resolve_layouts(data_dir, self.title, (*self.layouts, image_folder.IMAGE_FOLDER), self.download,
                               download)


DATASETS = {d.name: d for d in (
    Dataset("cifar10", "CIFAR-10", 10, (32, 32), CIFAR10_MEAN, CIFAR10_STD, False, (cifar10.LAYOUT,),
            cifar10.download),
    Dataset("svhn", "SVHN", 10, (32, 32), SVHN_MEAN, SVHN_STD, False, (svhn.LAYOUT,), svhn.download),
    Dataset("caltech101", "Caltech101", 101, (299, 299), IMAGENET_MEAN, IMAGENET_STD, True,
            (image_folder.CALTECH101,), image_folder.download_caltech101),
)}


def remote_parquet_pair(data_dir: Location, title: str) -> tuple[str, str]:
    """(train, test) URIs of ``data_dir`` in object storage (`resolve_layouts`'s steps a, b); else PoolError."""
    data_dir.check_bucket("--data-dir")
    for folder in (data_dir, data_dir / CONVERTED):
        train, test = folder / "train.parquet", folder / "test.parquet"
        if train.exists() and test.exists():
            return train.uri, test.uri
    found = [c.name for c in data_dir.children()][:10]
    raise PoolError(
        f"{title} was not found as Parquet in {data_dir.uri} (found {found or 'nothing'}): a --data-dir in object "
        f"storage must hold train.parquet and test.parquet (files or folders of shards; columns image, label, "
        f"optional id); torchvision's files, an image folder or a download are converted only on local disk. Fix: "
        f"run once with a local --data-dir DIR (it converts or downloads into DIR/{CONVERTED}/), upload "
        f"DIR/{CONVERTED}/train.parquet and test.parquet to {data_dir.uri}/, and pass that URI")


def get_dataset(name: str) -> Dataset:
    """The registered dataset ``name``; KeyError listing the names otherwise."""
    if name not in DATASETS:
        raise KeyError(f"dataset {name!r} is not registered; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def resolve_cifar10(data_dir: str | Path, download: bool = True) -> tuple[Path, Path]:
    """(train, test) Parquet pool sources for CIFAR-10 under ``data_dir``; PoolError when there is none."""
    return DATASETS["cifar10"].resolve(data_dir, download)
