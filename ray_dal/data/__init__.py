"""The data layer: pools of (id, encoded image, label) in Parquet, the datasets and their on-disk layouts,
and batch decoding/normalisation.

Names are imported on first use (PEP 562): Ray Data read tasks unpickle functions of
``ray_dal.data.pools``, and importing this package must not pull torch into every read worker.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ray_dal.data.datasets": ("DATASETS", "Dataset", "get_dataset", "resolve_cifar10"),
    "ray_dal.data.image_files": ("resolve_pool",),
    "ray_dal.data.labels": ("class_names", "encode_labels", "load_labels", "read_label_file", "write_label_file"),
    "ray_dal.data.pools": ("READ_CPUS", "PoolError", "PoolInfo", "RowGroup", "aligned_labels", "inspect_pool",
                           "read_ids", "read_labeled", "read_labels", "read_pool", "read_rows", "select_row_groups"),
    "ray_dal.data.synthetic": ("write_synthetic_pool",),
    "ray_dal.data.transforms": ("CIFAR10_MEAN", "CIFAR10_STD", "DEFAULT_TRANSFORM", "ImageDecodeError",
                                "ImageTransform", "decode_images", "normalize", "preprocess_batch"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'ray_dal.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
