"""Held-out labeled rows (a round's test set) riding in a pool pass: the same actors and model serve both.

A pass streams the pool's rows, then the held-out ones (`with_held_out`: a ``held_out`` column tells them apart;
their ids live apart from the pool's). An actor (`PoolScorer`, `PoolEmbedder`) splits each batch with
`split_batch`, tests the model on the held-out part (`test_batch`) and returns its
counts in the columns ``correct`` and ``tested`` of its output, plus the ids of held-out images that could not
be decoded (rows with ``held_out`` and ``skipped`` True). `Tally` sums them on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pyarrow as pa
import ray
import torch

from ..data import READ_CPUS, ImageTransform
from .decode import decoded

HELD_OUT = "held_out"  # column of the actors' input and output: True on held-out rows


@dataclass
class HeldOutRows:
    """Labeled samples to test the model on in a pool pass: ``rows`` a Ray Dataset with columns ``id``, ``image``,
    ``label`` (`ray_dal.data.read_pool`, `ray_dal.data.read_labeled`) of ``count`` rows. Never candidates; a
    pass's ``exclude_ids`` do not apply to them."""

    rows: ray.data.Dataset
    count: int


@dataclass
class Tested:
    """The model on `HeldOutRows`: ``correct`` of ``tested`` decoded rows; ``skipped_ids`` of images that could
    not be decoded under ``on_bad="skip"`` (sorted)."""

    correct: int
    tested: int
    skipped_ids: np.ndarray


def with_held_out(pool_rows: ray.data.Dataset, held_out: HeldOutRows | None) -> list[ray.data.Dataset]:
    """The parts of one pass (`ray_dal.pipeline.scorer_pool.on_actors`): ``pool_rows`` (``id``, ``image``), then
    ``held_out``'s rows when given (then every row of both has ``label``, -1 on pool rows, and the `HELD_OUT` flag)."""
    if held_out is None:
        return [pool_rows]
    return [_tagged(pool_rows, False), _tagged(held_out.rows.select_columns(["id", "image", "label"]), True)]


def _tagged(rows: ray.data.Dataset, held_out: bool) -> ray.data.Dataset:
    return rows.map_batches(_tag, batch_format="pyarrow", num_cpus=READ_CPUS, fn_kwargs={"held_out": held_out})


def _tag(batch: pa.Table, held_out: bool) -> pa.Table:
    if "label" not in batch.column_names:
        batch = batch.append_column("label", pa.array(np.full(batch.num_rows, -1, np.int64)))
    return batch.append_column(HELD_OUT, pa.array(np.full(batch.num_rows, held_out)))


def split_batch(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(the pool rows, the held-out rows with their ``label``, or None): ``id`` and the image columns (``image``,
    or ``x`` and ``x_shape`` when decoded ahead: `ray_dal.pipeline.decode`)."""
    flag = np.asarray(batch[HELD_OUT], bool) if HELD_OUT in batch else np.zeros(len(batch["id"]), bool)
    columns = [name for name in batch if name not in (HELD_OUT, "label")]
    pool = {name: np.asarray(batch[name])[~flag] for name in columns}  # copies: batches are read-only
    if not flag.any():
        return pool, None
    return pool, {name: np.asarray(batch[name])[flag] for name in (*columns, "label")}


def output_rows(kept: np.ndarray, skipped: np.ndarray, skipped_held_out: np.ndarray,
                counts: Mapping[str, int]) -> dict[str, np.ndarray]:
    """The id, ``skipped`` and ``held_out`` columns of a pool pass's output batch, and a column per count: rows
    ``kept`` (the pool ids with results), then the undecodable pool images (``skipped``), the undecodable
    held-out images (``skipped`` and ``held_out``), and a last row (id -1, ``held_out``) carrying ``counts``,
    0 on every other row, so that a count's sum over all batches is the pass's total."""
    n = kept.size + skipped.size + skipped_held_out.size + 1
    rows = np.arange(n)
    out = {"id": np.concatenate([kept, skipped, skipped_held_out, [-1]]).astype(np.int64),
           "skipped": (rows >= kept.size) & (rows < n - 1), HELD_OUT: rows >= kept.size + skipped.size}
    for name, value in counts.items():
        out[name] = np.zeros(n, np.int64)
        out[name][-1] = value
    return out


@dataclass
class Tally:
    """The driver's sum of the actors' held-out counts (`Tested` once the pass is done)."""

    correct: int = 0
    tested: int = 0
    skipped: list[np.ndarray] = field(default_factory=list)

    def add(self, out: dict[str, np.ndarray]) -> int:
        """Count one output batch; returns its held-out rows done (tested or skipped), for a progress bar."""
        bad = np.asarray(out["skipped"], bool) & np.asarray(out[HELD_OUT], bool)
        self.skipped.append(np.asarray(out["id"])[bad])
        tested = int(out["tested"].sum())
        self.correct += int(out["correct"].sum())
        self.tested += tested
        return tested + int(bad.sum())

    def result(self) -> Tested:
        return Tested(self.correct, self.tested, sorted_ids(self.skipped))


def sorted_ids(parts: list[np.ndarray]) -> np.ndarray:
    """The concatenation of ``parts``, sorted, int64 (empty when there are none)."""
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)


def count_right(model: torch.nn.Module, x: np.ndarray, labels: np.ndarray, device: torch.device | str) -> int:
    """How many rows of ``x`` (float32 [N, C, H, W]) ``model`` (in eval mode) predicts as ``labels`` [N]."""
    if len(labels) == 0:
        return 0
    with torch.inference_mode():
        logits = model(torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device))
    return int((logits.argmax(dim=1).cpu() == torch.from_numpy(np.asarray(labels, np.int64))).sum().item())


def test_batch(model: torch.nn.Module, rows: Mapping[str, np.ndarray], transform: ImageTransform, on_bad: str,
               device: torch.device | str) -> tuple[int, int, np.ndarray]:
    """(correct, tested, ids of images skipped under ``on_bad="skip"``) of ``model`` on ``rows`` (``id``,
    ``label`` and ``image``, decoded with ``transform``, or decoded ahead: `ray_dal.pipeline.decode.decoded`)."""
    ids = np.asarray(rows["id"], np.int64)
    usable = decoded(rows, transform, on_bad)
    correct = count_right(model, usable["x"], usable["label"], device)
    return correct, len(usable["label"]), np.setdiff1d(ids, usable["id"])
