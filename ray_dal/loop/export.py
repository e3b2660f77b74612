"""A run's latest query, for the people who label it: `latest_query`, `query_images`, `export_query`.

``ray-dal export --run RUN --format {parquet,csv,label-studio} --out PATH`` writes the query of the run's
latest round that has one: ``id, score, rank, pred, pred_name, prob`` (and the image's ``path`` when the
pool has one) as Parquet or CSV, or Label Studio tasks (JSON that Label Studio imports as it is: the
image as a data URI, the ray_dal id, the model's prediction as a pre-annotation with its probability).
``RUN`` and ``PATH`` may be local paths or object-store URIs (`ray_dal.storage`); exporting only reads the
run (it takes no lease, so it works while a round runs, and sees only committed rounds).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..config import ConfigError
from ..data import DATASETS, PoolInfo, class_names, inspect_pool, read_rows, resolve_pool
from ..storage import Location, location
from .run_dir import RunDir

FORMATS = ("parquet", "csv", "label-studio")


@dataclass
class RunQuery:
    """Round ``round``'s query, in rank order: ``pred`` int64 class indices, ``prob`` their probabilities."""

    run: Location
    round: int
    ids: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    classes: list[str]  # the run's class names ("0".."K-1" when it has none)
    pool: PoolInfo  # the Parquet pool the ids belong to (inspected once)
    paths: list[str] | None  # each image's path in its folder, for a pool made from a folder of images

    @property
    def pred_names(self) -> list[str]:
        return [self.classes[p] if 0 <= p < len(self.classes) else "" for p in self.pred.tolist()]


def latest_query(run: str | Path | Location) -> RunQuery:
    """The query of the latest round of ``run`` that has one; `ConfigError` when there is none."""
    run_dir = RunDir(run)
    if not (run_dir.root / "config.yaml").is_file():
        raise ConfigError(f"{run_dir.root} is not a ray_dal run folder (no config.yaml). Fix: pass the --run or "
                          "--out folder of a ray-dal round or job")
    with_query = [r for r in run_dir.completed_rounds() if (run_dir.round_path(r) / "selected.parquet").is_file()]
    if not with_query:
        raise ConfigError(f"{run_dir.root} holds no query yet. Fix: run `ray-dal round` (or the job) first")
    cfg = run_dir.config()
    r = with_query[-1]
    selected = run_dir.round_path(r) / "selected.parquet"
    with selected.errors("reading"):
        table = pq.read_table(selected.path, filesystem=selected.fs)
    n = table.num_rows
    if "pred" not in table.column_names:  # written before queries carried the model's prediction
        table = table.append_column("pred", pa.array(np.full(n, -1, np.int64))) \
                     .append_column("prob", pa.array(np.full(n, np.nan)))
    if cfg.loop.labels is not None:
        pool = inspect_pool(resolve_pool(cfg.data.data_dir))
    else:
        pool = inspect_pool(DATASETS[cfg.data.dataset].resolve(cfg.data.data_dir, download=False)[0])
    ids = table["id"].to_numpy()
    first = location(pool.files[0])
    with first.errors("reading"), first.open_input() as f:
        has_paths = "path" in pq.read_schema(f).names
    paths = read_rows(pool, ids, ("path",))["path"].to_pylist() if has_paths else None
    return RunQuery(run_dir.root, r, ids, *(table[c].to_numpy() for c in ("score", "rank", "pred", "prob")),
                    class_names(cfg.data.classes, cfg.model.num_classes), pool, paths)


def query_images(query: RunQuery) -> list[bytes]:
    """The encoded images of the query's samples, in rank order (read from the pool on this machine)."""
    return read_rows(query.pool, query.ids, ("image",))["image"].to_pylist()


def query_table(query: RunQuery) -> pa.Table:
    """The query as a table: id, score, rank, pred, pred_name, prob, and path when the pool has one."""
    table = pa.table({"id": query.ids, "score": query.scores, "rank": query.ranks, "pred": query.pred,
                      "pred_name": query.pred_names, "prob": query.prob})
    return table if query.paths is None else table.append_column("path", pa.array(query.paths, pa.string()))


def export_query(run: str | Path | Location, fmt: str, out: str | Path | Location) -> tuple[RunQuery, Location]:
    """Write the latest query of ``run`` to ``out`` (a path or a URI) as ``fmt`` (one of `FORMATS`), whole."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is unknown; choose one of {list(FORMATS)}")
    out = location(out)
    query = latest_query(run)
    if fmt == "label-studio":
        from ..integrations.label_studio import build_tasks

        tasks = build_tasks(query.ids, query.scores, query.ranks, query.pred, query.prob, query_images(query),
                            query.classes, f"ray_dal round {query.round}", query.paths)
        out.write_text(json.dumps(tasks))
        return query, out
    buffer = pa.BufferOutputStream()
    (pq.write_table if fmt == "parquet" else pacsv.write_csv)(query_table(query), buffer)
    out.write_bytes(buffer.getvalue().to_pybytes())
    return query, out

