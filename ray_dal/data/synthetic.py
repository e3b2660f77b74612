"""Synthetic image pools of any size, for benchmarks (``python -m ray_dal.data.synthetic --help``).

To be fast at a million rows, only a bank of ``min(num_samples, 4096)`` distinct images is encoded: bank
image j belongs to class j % num_classes (a class colour plus smooth seeded noise, so a model can learn
something). Sample i shows bank image k_i, drawn with a seeded generator, and carries k_i's class as
its label. Image bytes are stored without dictionary encoding, so files have the size (and read cost)
of a pool of distinct images.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

BANK_SIZE = 4096
ENCODINGS = {"jpeg": "JPEG", "png": "PNG"}


def _bank(
    n: int, image_size: tuple[int, int], num_classes: int, encoding: str, seed: int
) -> tuple[pa.Array, np.ndarray]:
    """n encoded images (binary array) and their classes (int64 [n])."""
    rng = np.random.default_rng(seed)
    h, w = image_size
    class_colours = rng.uniform(40, 215, size=(num_classes, 3))
    classes = np.arange(n, dtype=np.int64) % num_classes
    blobs = []
    for c in classes:
        coarse = rng.normal(0, 40, size=(max(h // 8, 1), max(w // 8, 1))).astype(np.float32)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))
        pixels = class_colours[c] + smooth[..., None] + rng.normal(0, 12, size=(h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format=ENCODINGS[encoding])
        blobs.append(buf.getvalue())
    return pa.array(blobs, pa.binary()), classes


def write_synthetic_pool(
    out_dir: str | Path,
    num_samples: int,
    image_size: tuple[int, int] = (32, 32),
    num_classes: int = 10,
    rows_per_file: int = 100_000,
    rows_per_group: int = 5_000,
    seed: int = 0,
    encoding: str = "jpeg",
) -> list[Path]:
    """Write ``num_samples`` rows (image bytes, label int64) as part-NNNNN.parquet shards in ``out_dir``.

    ``out_dir`` must not already hold .parquet files (they would join the pool). Returns the shard paths.
    """
    for name, value, low in (("num_samples", num_samples, 1), ("num_classes", num_classes, 1),
                             ("rows_per_file", rows_per_file, 1), ("rows_per_group", rows_per_group, 1)):
        if int(value) < low:
            raise ValueError(f"{name} = {value} is invalid: must be >= {low}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding = {encoding!r} is invalid: choose one of {list(ENCODINGS)}")
    if len(image_size) != 2 or min(image_size) < 1:
        raise ValueError(f"image_size = {image_size} is invalid: give (height, width), both >= 1")
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.parquet")):
        raise ValueError(f"{out_dir} already holds .parquet files; write a synthetic pool into an empty folder")

    bank, bank_classes = _bank(min(num_samples, BANK_SIZE), tuple(image_size), num_classes, encoding, seed)
    picks = np.random.default_rng(seed + 1).integers(0, len(bank), size=num_samples)
    paths = []
    for start in range(0, num_samples, rows_per_file):
        rows = picks[start:start + rows_per_file]
        table = pa.table({"image": bank.take(pa.array(rows)), "label": pa.array(bank_classes[rows])})
        path = out_dir / f"part-{len(paths):05d}.parquet"
        tmp = out_dir / f".{path.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp, row_group_size=rows_per_group, use_dictionary=["label"], compression="none")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a synthetic image pool (Parquet shards) for benchmarks.")
    p.add_argument("--out", required=True, help="empty (or new) output folder")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--image-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rows-per-file", type=int, default=100_000)
    p.add_argument("--rows-per-group", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoding", choices=sorted(ENCODINGS), default="jpeg")
    a = p.parse_args(argv)
    start = time.perf_counter()
    paths = write_synthetic_pool(a.out, a.num_samples, tuple(a.image_size), a.num_classes, a.rows_per_file,
                                 a.rows_per_group, a.seed, a.encoding)
    print(f"wrote {a.num_samples} samples in {len(paths)} file(s) to {a.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
