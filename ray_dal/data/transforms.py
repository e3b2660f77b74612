"""Turning encoded images into model inputs, one batch at a time.

Preprocessing (the same for training, scoring and evaluation; there is no augmentation), set by an
`ImageTransform` (a dataset's comes from `ray_dal.data.datasets`; the default is CIFAR-10's statistics):
  1. decode each encoded image (JPEG, PNG, ... anything PIL reads) and convert it to RGB
     (grayscale, palette and RGBA images included; alpha is dropped);
  2. with ``resize``, resize it to ``image_size`` (PIL bilinear, antialiased; the aspect ratio is not
     kept); without, every image of a batch must have the same size (``image_size`` or the first
     good image's) and another size makes the image bad;
  3. scale to [0, 1] (x / 255), then standardise each channel: (x - mean) / std;
  4. lay out as float32 [B, 3, H, W] (channels first, as torch models expect).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ON_BAD = ("fail", "skip")
_MAX_LISTED = 20


@dataclass(frozen=True)
class ImageTransform:
    """How encoded images become model inputs (steps 1-4 above); small and picklable, so it travels to actors.

    ``image_size`` (H, W) or one int for a square: the size every image must have, or is resized to with
    ``resize``; None: every image of a batch must match the first decodable one. ``mean``/``std``: the
    per-channel statistics of [0, 1] pixels. The default is CIFAR-10's statistics with no fixed size.
    """

    image_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    resize: bool = False

    def __post_init__(self):
        size = self.image_size
        if isinstance(size, (int, np.integer)):
            size = (size, size)
        if size is not None:
            if len(size) != 2 or any(int(v) != v or v < 1 for v in size):
                raise ValueError(f"image_size = {self.image_size!r} is invalid: give (height, width) or one int, "
                                 "all >= 1")
            size = (int(size[0]), int(size[1]))
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean = {self.mean!r}, std = {self.std!r} are invalid: give 3 values each (R, G, B), "
                             "std > 0")
        if self.resize and size is None:
            raise ValueError("resize=True needs an image_size to resize to")
        for name, value in (("image_size", size), ("mean", mean), ("std", std), ("resize", bool(self.resize))):
            object.__setattr__(self, name, value)


DEFAULT_TRANSFORM = ImageTransform()


class ImageDecodeError(ValueError):
    """Some images of a batch could not be used; ``bad_ids`` lists all of them."""

    def __init__(self, bad_ids: list[int], reasons: list[str], batch_size: int):
        self.bad_ids, self.reasons, self.batch_size = list(bad_ids), list(reasons), batch_size
        listed = "; ".join(f"id {i}: {r}" for i, r in zip(bad_ids[:_MAX_LISTED], reasons[:_MAX_LISTED]))
        more = f"; ... and {len(bad_ids) - _MAX_LISTED} more" if len(bad_ids) > _MAX_LISTED else ""
        super().__init__(
            f"{len(bad_ids)} of {batch_size} images in this batch could not be used ({listed}{more}). "
            "Fix: re-encode or remove these rows from the pool, or drop them with on_bad='skip' "
            "(config: data.on_bad_image: skip)."
        )

    def __reduce__(self):  # survives the trip from a Ray worker to the driver
        return type(self), (self.bad_ids, self.reasons, self.batch_size)


def _decode_one(blob, resize_to: tuple[int, int] | None = None) -> np.ndarray:
    """One encoded image -> uint8 [H, W, 3], resized to ``resize_to`` (H, W) if given; ValueError says why not."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"undecodable: expected image bytes, got {type(blob).__name__}")
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert("RGB") if img.mode != "RGB" else img
            img.load()
            if resize_to is not None and img.size != (resize_to[1], resize_to[0]):
                img = img.resize((resize_to[1], resize_to[0]), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None


def decode_images(
    blobs: Sequence[bytes],
    ids: Sequence[int] | np.ndarray | None = None,
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
) -> tuple[np.ndarray, np.ndarray]:
    """Decode B encoded images to RGB (steps 1-2 of ``transform``; its statistics are not used here).

    Returns ``(images, keep)``: images uint8 [N, H, W, 3] of the usable images in batch order, and
    keep bool [B] marking them (N = keep.sum()). ``ids`` (default: batch positions) name the images in errors.
    on_bad="fail" raises `ImageDecodeError` listing every bad id of the batch; "skip" drops them.
    With no usable image and no ``image_size`` the result has shape [0, 0, 0, 3].
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad={on_bad!r} is invalid: choose one of {list(ON_BAD)}")
    n = len(blobs)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    if len(ids) != n:
        raise ValueError(f"decode_images got {n} images but {len(ids)} ids; pass one id per image")
    keep = np.zeros(n, dtype=bool)
    out: np.ndarray | None = None
    bad_ids: list[int] = []
    reasons: list[str] = []
    image_size = transform.image_size
    for i, blob in enumerate(blobs):
        try:
            img = _decode_one(blob, image_size if transform.resize else None)
            if image_size is None:
                image_size = img.shape[:2]
            if img.shape[:2] != tuple(image_size):
                raise ValueError(
                    f"wrong size {img.shape[0]}x{img.shape[1]}, expected {image_size[0]}x{image_size[1]}"
                )
        except ValueError as e:
            bad_ids.append(int(ids[i]))
            reasons.append(str(e))
            continue
        if out is None:
            out = np.empty((n, *img.shape), dtype=np.uint8)
        out[i] = img
        keep[i] = True
    if bad_ids and on_bad == "fail":
        raise ImageDecodeError(bad_ids, reasons, n)
    if out is None:
        h, w = image_size if image_size is not None else (0, 0)
        return np.empty((0, h, w, 3), dtype=np.uint8), keep
    return (out if keep.all() else out[keep]), keep


def normalize(images: np.ndarray, transform: ImageTransform = DEFAULT_TRANSFORM) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W]: x / 255, then (x - mean) / std per channel (``transform``'s)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 images [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    mean = np.asarray(transform.mean, dtype=np.float32)
    std = np.asarray(transform.std, dtype=np.float32)
    # astype copies, so read-only input (Ray batches) is never written and torch gets a writable array
    x = images.astype(np.float32)
    x /= 255.0
    x -= mean
    x /= std
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def preprocess_batch(
    batch: dict[str, np.ndarray],
    transform: ImageTransform = DEFAULT_TRANSFORM,
    on_bad: str = "fail",
) -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches(batch_format="numpy")`` function: decode and normalise a batch (``transform``).

    Input columns ``id`` and ``image`` (encoded bytes), optionally ``label``. Output ``id`` int64 [N],
    ``x`` float32 [N, 3, H, W] and ``label`` int64 [N] if given; rows of skipped images are dropped.
    The input arrays are only read (Ray batches are read-only).
    """
    missing = [c for c in ("id", "image") if c not in batch]
    if missing:
        raise KeyError(f"preprocess_batch needs columns 'id' and 'image'; missing {missing}, got {sorted(batch)}")
    ids = np.asarray(batch["id"], dtype=np.int64)
    images, keep = decode_images(batch["image"], ids, transform, on_bad=on_bad)
    out = {"id": ids[keep], "x": normalize(images, transform).numpy()}
    if "label" in batch:
        out["label"] = np.asarray(batch["label"], dtype=np.int64)[keep]
    return out
