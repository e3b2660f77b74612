"""Small, seeded slices of the real CIFAR-10 Parquet files (rows are grouped by class: never a prefix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_slice(source: Path, dest: Path, rows: int, seed: int, row_group_size: int = 500) -> np.ndarray:
    """Write ``rows`` seeded random rows of ``source`` to ``dest`` with their original row index as ``id``."""
    table = pq.read_table(source, columns=["image", "label"])
    ids = np.sort(np.random.default_rng(seed).choice(table.num_rows, rows, replace=False))
    part = table.take(pa.array(ids)).append_column("id", pa.array(ids, pa.int64()))
    pq.write_table(part, dest, row_group_size=row_group_size)
    return ids
