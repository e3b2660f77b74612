"""The run directory of an active-learning experiment: its public layout, atomic rounds, resume.

    OUT/config.yaml                  resolved configuration
    OUT/metrics.jsonl                one JSON line per completed round
    OUT/round_000/labeled.parquet    (id, label) of the labeled set S used in that round
    OUT/round_000/model.pt           state_dict trained on S (load with torch.load(..., weights_only=True))
    OUT/round_000/selected.parquet   (id, score, rank, pred, prob) of the query chosen by that model, with its
                                     predicted class and that class's probability (not in the last round)
    OUT/round_000/metrics.json       that round's metrics line
    OUT/logs/ray.log                 ray_dal's log lines and Ray's own output (`ray_dal.console`)

A round is written into ``OUT/.round_000.partial`` and renamed into place once every file is on
disk, so a ``round_*`` folder is always complete: a run killed at any point resumes after its last
complete round and never re-queries or duplicates one: `RunDir.start` deletes partial folders and
temp files a killed run left behind. ``metrics.jsonl`` is derived data, rebuilt from the round
folders after each round and on every start (a kill between a round's rename and that rebuild
leaves it one line short until then).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from ..pipeline.actors import load_weights_file
from ..config import ConfigError, ExperimentConfig, save_config

_ROUND = re.compile(r"^round_(\d{3,})$")

# Settings that change how fast a run goes or where its files are, not what it computes: a resumed run
# may change them (so a run folder can be moved, and its data too). on_bad_image too: a round that
# completed under "fail" met no bad image, so "skip" would have computed the same round.
_NOT_IDENTITY = {"runtime": None, "data": {"data_dir", "on_bad_image"}, "loop": {"out"},
                 "scoring": {"num_scorers", "cpus_per_scorer", "gpus_per_scorer", "batch_size"},
                 "train": {"cpus_per_worker", "use_gpu", "checkpoint_every_s"}}
# A run whose labels come from people (`ray-dal round`) takes each round's labels file and budget as they come.
_NOT_IDENTITY_WITH_PEOPLE = {"labels", "budget", "initial", "rounds"}


@dataclass
class Round:
    """What a completed round left on disk."""

    index: int
    labeled_ids: np.ndarray
    labeled_labels: np.ndarray
    state_dict: dict[str, torch.Tensor]
    selected_ids: np.ndarray | None  # None in the final (evaluation-only) round


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "ray.log"

    def round_path(self, index: int) -> Path:
        return self.root / f"round_{index:03d}"

    def completed_rounds(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = sorted(int(m.group(1)) for p in self.root.iterdir() if p.is_dir() and (m := _ROUND.match(p.name)))
        if found != list(range(len(found))):
            raise ConfigError(f"{self.root} holds rounds {found}: a round is missing; this is not a ray_dal run folder")
        return found

    def start(self, cfg: ExperimentConfig) -> None:
        """Create the folder and write config.yaml, or check that a resumed run computes the same thing."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "config.yaml"
        if path.exists():
            before = yaml.safe_load(path.read_text()) or {}
            diffs = _identity_diffs(before, cfg.to_dict())
            if diffs:
                raise ConfigError(
                    f"{self.root} holds a run with a different configuration ({'; '.join(diffs)}). "
                    "Resume it with the same settings, or pass a new --out."
                )
        _atomic_write(path, lambda tmp: save_config(cfg, tmp))
        for stale in self.root.glob(".round_*.partial"):  # left by a run killed mid-write
            shutil.rmtree(stale)
        for stale in self.root.glob(".*.tmp"):  # a temp file of an _atomic_write cut short
            stale.unlink()
        self._rebuild_metrics()

    def load(self, index: int) -> Round:
        """Round ``index`` from disk; `WeightsError` if its model.pt is not plain weights (never unpickles code)."""
        path = self.round_path(index)
        missing = [f for f in ("labeled.parquet", "model.pt", "metrics.json") if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{path} lacks {missing}: it was changed after ray_dal wrote it. Fix: delete "
                              f"{path.name} and the rounds after it to recompute them, or pass a new --out")
        labeled = pq.read_table(path / "labeled.parquet")
        selected = path / "selected.parquet"
        state_dict = load_weights_file(path / "model.pt", f"Fix: delete {path.name} and the rounds after it to "
                                       "recompute them, or pass a new --out")
        return Round(
            index=index,
            labeled_ids=labeled["id"].to_numpy(),
            labeled_labels=labeled["label"].to_numpy(),
            state_dict=state_dict,
            selected_ids=pq.read_table(selected)["id"].to_numpy() if selected.exists() else None,
        )

    def write_round(
        self,
        index: int,
        labeled_ids: np.ndarray,
        labeled_labels: np.ndarray,
        state_dict: dict[str, torch.Tensor],
        metrics: dict[str, Any],
        selected: Mapping[str, np.ndarray] | None,
    ) -> Path:
        """Write every file of round ``index`` into a partial folder, then rename it into place.

        ``selected``: the query's columns ``id`` and ``score`` in rank order, and ``pred``/``prob`` (`query_table`).
        """
        final, partial = self.round_path(index), self.root / f".round_{index:03d}.partial"
        if final.exists():
            raise FileExistsError(f"{final} is already complete; a round is never written twice")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pq.write_table(pa.table({"id": np.asarray(labeled_ids, np.int64),
                                 "label": np.asarray(labeled_labels, np.int64)}), partial / "labeled.parquet")
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, partial / "model.pt")
        if selected is not None:
            pq.write_table(query_table(**selected), partial / "selected.parquet")
        (partial / "metrics.json").write_text(json.dumps(metrics))
        _fsync_tree(partial)
        os.rename(partial, final)
        _fsync_dir(self.root)  # the rename itself survives a crash of the machine
        self._rebuild_metrics()
        return final

    def selected_ids(self, index: int) -> np.ndarray:
        """Round ``index``'s query, in rank order."""
        return pq.read_table(self.round_path(index) / "selected.parquet")["id"].to_numpy()

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads((self.round_path(i) / "metrics.json").read_text()) for i in self.completed_rounds()]

    def _rebuild_metrics(self) -> None:
        lines = "".join(json.dumps(m) + "\n" for m in self.metrics())
        _atomic_write(self.root / "metrics.jsonl", lambda tmp: Path(tmp).write_text(lines))


def query_table(id: np.ndarray, score: np.ndarray, pred: np.ndarray | None = None,
                prob: np.ndarray | None = None) -> pa.Table:
    """A query as written to disk: ``id``, ``score``, ``rank`` (0 first) and, when known, the model's
    predicted class ``pred`` and its probability ``prob``."""
    columns = {"id": np.asarray(id, np.int64), "score": np.asarray(score, np.float64),
               "rank": np.arange(len(id), dtype=np.int64)}
    if pred is not None:
        columns.update(pred=np.asarray(pred, np.int64), prob=np.asarray(prob, np.float64))
    return pa.table(columns)


def _identity_diffs(before: dict, now: dict) -> list[str]:
    not_identity = dict(_NOT_IDENTITY)
    if all((config.get("loop") or {}).get("labels") for config in (before, now)):
        not_identity["loop"] = _NOT_IDENTITY["loop"] | _NOT_IDENTITY_WITH_PEOPLE
    diffs = []
    for section in sorted(set(before) | set(now)):
        skip = not_identity.get(section, set())
        if skip is None:
            continue
        old, new = before.get(section) or {}, now.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if key not in skip and old.get(key) != new.get(key):
                diffs.append(f"{section}.{key}: {old.get(key)!r} before, {new.get(key)!r} now")
    return diffs


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
