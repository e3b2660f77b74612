"""Turning encoded images into model inputs, one batch at a time.

Preprocessing (the same for training, scoring and evaluation; there is no augmentation), set by an
`ImageTransform` (a dataset's comes from `ray_dal.data.datasets`; the default is CIFAR-10's statistics):
  1. decode each encoded image (JPEG, PNG, ... anything PIL reads) and convert it to RGB
     (grayscale, palette and RGBA images included; alpha is dropped). JPEGs go through
     torchvision's libjpeg-turbo decoder (the op behind ``torchvision.io.decode_jpeg``; 2.5-4x faster than
     PIL on CIFAR-10 and pixel-identical to PIL's RGB conversion there and on 4:4:4/4:2:2/4:2:0, progressive,
     grayscale and CMYK JPEGs: tests/test_data.py); any image it rejects, and every image when the op is
     unavailable, is decoded by PIL, which names the problem;
  2. with ``resize``, resize it to ``image_size`` (PIL bilinear, antialiased; the aspect ratio is not
     kept); without, every image of a batch must have the same size (``image_size`` or the first
     good image's) and another size makes the image bad;
  3. scale to [0, 1] (x / 255), then standardise each channel: (x - mean) / std;
  4. lay out as float32 [B, 3, H, W] (channels first, as torch models expect).
"""

from __future__ import annotations

import functools
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
ON_BAD = ("fail", "skip")
_MAX_LISTED = 20
_JPEG_MAGIC = b"\xff\xd8\xff"
_RGB = 3  # torchvision.io.ImageReadMode.RGB


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


def _decode_pil(blob) -> np.ndarray:
    """One encoded image -> uint8 [H, W, 3] with PIL (the reference decoder); ValueError says why not."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"undecodable: expected image bytes, got {type(blob).__name__}")
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert("RGB") if img.mode != "RGB" else img
            img.load()
            return np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"undecodable: {type(e).__name__}: {e}") from None


@functools.cache
def _libjpeg_turbo():
    """torchvision's JPEG decoder op, ``torch.ops.image.decode_jpeg(data, mode, apply_exif_orientation)`` (what
    ``torchvision.io.decode_jpeg`` calls on CPU), loaded from torchvision's image library without importing
    torchvision: that import costs ~1.5 s in every fresh Ray worker. None when unavailable (then PIL decodes)."""
    try:
        folder = Path(importlib.util.find_spec("torchvision").submodule_search_locations[0])
        library = next(p for p in sorted(folder.glob("image*")) if p.suffix in (".so", ".pyd", ".dylib"))
        torch.ops.load_library(str(library))
        return torch.ops.image.decode_jpeg
    except Exception:  # no torchvision, no image library, or an op that moved: the PIL path stays exact
        return None


def _decode_jpeg(blob) -> np.ndarray | None:
    """One JPEG -> uint8 [H, W, 3] by libjpeg-turbo; None for anything else, or a JPEG it rejects (PIL then decides)."""
    decode = _libjpeg_turbo()
    if decode is None or not isinstance(blob, (bytes, bytearray, memoryview)) or bytes(blob[:3]) != _JPEG_MAGIC:
        return None
    try:  # bytearray: a copy, since torch wants a writable buffer and bytes are read-only
        return decode(torch.frombuffer(bytearray(blob), dtype=torch.uint8), _RGB, False).permute(1, 2, 0).numpy()
    except RuntimeError:  # truncated or corrupt: PIL decodes it or says why not
        return None


def _resized(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [size[0], size[1], 3], PIL bilinear (antialiased); unchanged if already that size."""
    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR), dtype=np.uint8)


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
            img = _decode_jpeg(blob)
            img = _decode_pil(blob) if img is None else img
            if transform.resize:
                img = _resized(img, image_size)
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


@functools.lru_cache(maxsize=16)
def _channel_tables(mean: tuple[float, float, float], std: tuple[float, float, float]) -> np.ndarray:
    """float32 [3, 256]: ``(v / 255 - mean_c) / std_c`` for every uint8 value v, computed in float32."""
    table = np.tile(np.arange(256, dtype=np.float32), (3, 1))
    table /= 255.0
    table -= np.asarray(mean, dtype=np.float32)[:, None]
    table /= np.asarray(std, dtype=np.float32)[:, None]
    return table


def normalize(images: np.ndarray, transform: ImageTransform = DEFAULT_TRANSFORM) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W]: x / 255, then (x - mean) / std per channel (``transform``'s)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 images [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    # A uint8 channel has 256 values: look them up (one pass per channel, straight into the channels-first
    # layout; the same float32 arithmetic as computing them, ~2x faster). The input is only read.
    table = _channel_tables(transform.mean, transform.std)
    out = np.empty((images.shape[0], 3, *images.shape[1:3]), dtype=np.float32)
    for c in range(3):
        np.take(table[c], images[..., c], out=out[:, c])
    return torch.from_numpy(out)


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
