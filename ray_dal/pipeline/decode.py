"""Where a pool pass decodes its images: in the scorer actors, or in CPU map tasks ahead of them.

``scoring.decode``: "actors" decodes inside each scorer (one thread per CPU scorer, which is all a CPU scorer
has anyway); "tasks" is Ray Data's batch-inference layout: CPU map tasks decode and normalise, so a GPU scorer's
single CPU thread only feeds its GPU; "auto" chooses "tasks" when the scorers hold GPUs. Both give the same
inputs, hence the same queries (tests/test_pool_scoring.py).

A decoded batch travels as columns ``x`` (each row's float32 [C, H, W] as bytes, ``b""`` for an image that
could not be decoded under ``on_bad="skip"``) and ``x_shape`` int64 [N, 3] (zeros for those), so a batch of
only bad images needs no image size. `decoded` turns either kind of batch into `preprocess_batch`'s output.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import ray

from ..config import ScoringConfig
from ..data import ImageTransform, decode_images, normalize, preprocess_batch
from ..errors import carry
from .actors import resolve, scorer_gpus

def decode_layout(scoring_cfg: ScoringConfig) -> str:
    """``scoring.decode``, with "auto" resolved: "tasks" when the scorers hold GPUs, else "actors"."""
    if scoring_cfg.decode != "auto":
        return scoring_cfg.decode
    return "tasks" if scorer_gpus(scoring_cfg) > 0 else "actors"


def decode_ahead(ds: ray.data.Dataset, scoring_cfg: ScoringConfig, transform: ImageTransform, on_bad: str,
                 exclude_ids: np.ndarray | None = None) -> ray.data.Dataset:
    """``ds`` (``id``, ``image``, any other columns) with its images decoded in CPU map tasks when
    `decode_layout` says "tasks" (pool rows in ``exclude_ids`` dropped first; held-out rows always kept),
    else ``ds`` as it is."""
    if decode_layout(scoring_cfg) != "tasks":
        return ds
    exclude_ref = ray.put(np.asarray(exclude_ids if exclude_ids is not None else [], np.int64))
    return ds.map_batches(carry(decode_rows), batch_format="numpy", batch_size=scoring_cfg.batch_size,
                          fn_kwargs={"transform": transform, "on_bad": on_bad, "exclude_ids": exclude_ref})


def decode_rows(batch: Mapping[str, np.ndarray], transform: ImageTransform, on_bad: str,
                exclude_ids: Any = None) -> dict[str, np.ndarray]:
    """A map_batches function: the rows (but pool rows in ``exclude_ids``, an array or its ObjectRef) with
    ``image`` replaced by ``x`` and ``x_shape`` (module docstring); ImageDecodeError under ``on_bad="fail"``."""
    ids = np.asarray(batch["id"], np.int64)
    keep = np.ones(ids.size, bool)
    exclude = resolve(exclude_ids)
    if exclude is not None and len(exclude):
        held_out = np.asarray(batch["held_out"], bool) if "held_out" in batch else np.zeros(ids.size, bool)
        keep = held_out | ~np.isin(ids, exclude)
    out = {name: np.asarray(col)[keep] for name, col in batch.items() if name != "image"}
    images, good = decode_images(np.asarray(batch["image"])[keep], out["id"], transform, on_bad=on_bad)
    x_good = normalize(images, transform).numpy()
    x = np.full(good.size, b"", dtype=object)
    x[good] = [row.tobytes() for row in x_good]
    shapes = np.zeros((good.size, 3), np.int64)
    shapes[good] = x_good.shape[1:]
    out.update(x=x, x_shape=shapes)
    return out


def decoded(rows: Mapping[str, np.ndarray], transform: ImageTransform, on_bad: str) -> dict[str, np.ndarray]:
    """`preprocess_batch`'s output (``id``, ``x``, ``label`` when given; undecodable rows left out) for rows with
    ``image`` (decoded here) or rows decoded ahead (``x``, ``x_shape``)."""
    if "x" not in rows:
        return preprocess_batch(dict(rows), transform=transform, on_bad=on_bad)
    shapes = np.asarray(rows["x_shape"], np.int64).reshape(-1, 3)
    good = shapes[:, 0] > 0
    kinds = {tuple(s) for s in shapes[good]}
    if len(kinds) > 1:
        raise ValueError(f"the images of one batch have different sizes {sorted(kinds)}: set data.image_size")
    shape = kinds.pop() if kinds else (3, 0, 0)
    x = np.frombuffer(b"".join(np.asarray(rows["x"])[good]), np.float32).reshape(-1, *shape)
    out = {"id": np.asarray(rows["id"], np.int64)[good], "x": x}
    if "label" in rows:
        out["label"] = np.asarray(rows["label"], np.int64)[good]
    return out
