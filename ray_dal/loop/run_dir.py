"""The run directory of an active-learning experiment: its public layout, atomic rounds, resume.

    OUT/config.yaml                  resolved configuration
    OUT/metrics.jsonl                one JSON line per completed round
    OUT/round_000/labeled.parquet    (id, label) of the labeled set S used in that round
    OUT/round_000/model.pt           state_dict trained on S (load with torch.load(..., weights_only=True))
    OUT/round_000/selected.parquet   (id, score, rank, pred, prob) of the query chosen by that model, with its
                                     predicted class and that class's probability (not in the last round)
    OUT/round_000/metrics.json       that round's metrics line
    OUT/round_000/_COMMITTED.json    the round's manifest: each file's name and size, written last
    OUT/ray_train/                   Ray Train's checkpoints of each round (`ray_dal.pipeline.training`)
    OUT/lease.json                   while a process works on the run (`ray_dal.storage.RunLease`)
    OUT/logs/ray.log                 ray_dal's log lines and Ray's own output (`ray_dal.console`); for a run in
                                     object storage, a local file instead (`RunDir.log_file`)

``OUT`` is a local path, ``file://`` or an object-store URI (``s3://bucket/prefix``; `ray_dal.storage`).
A round is committed atomically, so a run killed at any point resumes after its last complete round
and never re-queries or duplicates one:

- on disk, a round is written into ``OUT/.round_000.partial`` and renamed into place once every file is
  on disk (fsynced), so a ``round_*`` folder is complete by its name; `RunDir.start` deletes partial
  folders and temp files a killed run left behind;
- in an object store (no atomic rename), a round is written straight into ``OUT/round_000/`` and made
  visible by its manifest, written last: a round folder without a manifest, or whose objects' sizes
  disagree with it, is incomplete; readers skip it and `RunDir.start` deletes it, so the round is redone.

``config.yaml`` and ``metrics.jsonl`` are written whole (`Location.write_text`). ``metrics.jsonl`` is
derived data, rebuilt from the round folders after each round and on every start (a kill between a
round's commit and that rebuild leaves it one line short until then).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import yaml

from ..config import ConfigError, ExperimentConfig, load_config, save_config
from ..pipeline.actors import load_weights_file
from ..storage import Location, location
from ..storage.location import local_stand_in

_ROUND = re.compile(r"^round_(\d{3,})$")
MANIFEST = "_COMMITTED.json"

# Settings that change how fast a run goes or where its files are, not what it computes: a resumed run
# may change them (so a run folder can be moved, and its data too). on_bad_image too: a round that
# completed under "fail" met no bad image, so "skip" would have computed the same round.
_NOT_IDENTITY = {"runtime": None, "data": {"data_dir", "on_bad_image"}, "loop": {"out"},
                 "scoring": {"num_scorers", "cpus_per_scorer", "gpus_per_scorer", "batch_size", "decode",
                             "scorer_lifetime"},
                 "train": {"cpus_per_worker", "use_gpu", "checkpoint_every_s"}}
# A run whose labels come from people (`ray-dal round`) takes each round's labels file and budget as they come.
_NOT_IDENTITY_WITH_PEOPLE = {"labels", "budget", "initial", "rounds"}


@dataclass
class Round:
    """What a completed round left in the run directory."""

    index: int
    labeled_ids: np.ndarray
    labeled_labels: np.ndarray
    state_dict: dict[str, torch.Tensor]
    selected_ids: np.ndarray | None  # None in the final (evaluation-only) round


class RunDir:
    """A run directory; ``root`` a local path, a URI or a `Location` (`RunDir.root` is a `Location`)."""

    def __init__(self, root: str | Path | Location):
        root = location(root)
        self.root = location(Path(root.path).resolve()) if root.is_local else root

    @property
    def log_file(self) -> Path:
        """``OUT/logs/ray.log`` on disk. For a run in object storage a local file named after its URI,
        ``$RAY_DAL_LOG_DIR/<scheme>/<bucket>/<key>/ray.log`` (default folder ``~/.cache/ray_dal/logs``):
        Ray writes its output to a file descriptor, which cannot point into a bucket."""
        return local_stand_in(self.root) / ("logs/ray.log" if self.root.is_local else "ray.log")

    def round_path(self, index: int) -> Location:
        return self.root / f"round_{index:03d}"

    def completed_rounds(self) -> list[int]:
        found = sorted(index for index, complete in self._round_folders().items() if complete)
        if found != list(range(len(found))):
            raise ConfigError(f"{self.root} holds rounds {found}: a round is missing; this is not a ray_dal run folder")
        return found

    def start(self, cfg: ExperimentConfig) -> None:
        """Create the folder and write config.yaml, or check that a resumed run computes the same thing;
        then delete what a killed run left half-written."""
        self.root.mkdir()
        path = self.root / "config.yaml"
        if path.is_file():
            before = yaml.safe_load(path.read_text()) or {}
            diffs = _identity_diffs(before, cfg.to_dict())
            if diffs:
                raise ConfigError(
                    f"{self.root} holds a run with a different configuration ({'; '.join(diffs)}). "
                    "Resume it with the same settings, or pass a new --out."
                )
        save_config(cfg, path)
        if self.root.is_local:
            root = self.root.local
            for stale in root.glob(".round_*.partial"):  # left by a run killed mid-write
                shutil.rmtree(stale)
            for stale in root.glob(".*.tmp"):  # a temp file of a whole-file write cut short (not the live lease's)
                if stale.name != ".lease.json.tmp":
                    stale.unlink()
        else:
            for index, complete in self._round_folders().items():
                if not complete:  # written by a run killed before the manifest: redone
                    self.round_path(index).delete()
        self._rebuild_metrics()

    def config(self, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
        """The run's config.yaml (`ray_dal.config.load_config`), with ``overrides``."""
        return load_config(self.root / "config.yaml", overrides)

    def load(self, index: int) -> Round:
        """Round ``index``; `WeightsError` if its model.pt is not plain weights (never unpickles code)."""
        path = self.round_path(index)
        missing = [f for f in ("labeled.parquet", "model.pt", "metrics.json") if f not in _listing(path)]
        if missing:
            raise ConfigError(f"{path} lacks {missing}: it was changed after ray_dal wrote it. Fix: delete "
                              f"{path.name} and the rounds after it to recompute them, or pass a new --out")
        labeled = _read_table(path / "labeled.parquet")
        selected = path / "selected.parquet"
        state_dict = load_weights_file(path / "model.pt", f"Fix: delete {path.name} and the rounds after it to "
                                       "recompute them, or pass a new --out")
        return Round(
            index=index,
            labeled_ids=labeled["id"].to_numpy(),
            labeled_labels=labeled["label"].to_numpy(),
            state_dict=state_dict,
            selected_ids=_read_table(selected)["id"].to_numpy() if selected.is_file() else None,
        )

    def write_round(
        self,
        index: int,
        labeled_ids: np.ndarray,
        labeled_labels: np.ndarray,
        state_dict: dict[str, torch.Tensor],
        metrics: dict[str, Any],
        selected: Mapping[str, np.ndarray] | None,
    ) -> Location:
        """Write every file of round ``index`` and commit it (see the module docstring); returns its folder.

        ``selected``: the query's columns ``id`` and ``score`` in rank order, and ``pred``/``prob`` (`query_table`).
        """
        final = self.round_path(index)
        if self._round_folders().get(index):
            raise FileExistsError(f"{final} is already complete; a round is never written twice")
        labeled = pa.table({"id": np.asarray(labeled_ids, np.int64), "label": np.asarray(labeled_labels, np.int64)})
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        files: dict[str, Callable[[BinaryIO], Any]] = {
            "labeled.parquet": lambda f: pq.write_table(labeled, f),
            "model.pt": lambda f: torch.save(state, f),
        }
        if selected is not None:
            query = query_table(**selected)
            files["selected.parquet"] = lambda f: pq.write_table(query, f)
        files["metrics.json"] = lambda f: f.write(json.dumps(metrics).encode())
        (_commit_on_disk if self.root.is_local else _commit_in_object_store)(self.root, final, files)
        self._rebuild_metrics()
        return final

    def selected_ids(self, index: int) -> np.ndarray:
        """Round ``index``'s query, in rank order."""
        return _read_table(self.round_path(index) / "selected.parquet")["id"].to_numpy()

    def metrics(self) -> list[dict[str, Any]]:
        return [json.loads((self.round_path(i) / "metrics.json").read_text()) for i in self.completed_rounds()]

    def _rebuild_metrics(self) -> None:
        (self.root / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in self.metrics()))

    def _round_folders(self) -> dict[int, bool]:
        """``{index: complete}`` of the ``round_NNN`` folders (on disk complete by name, else by manifest)."""
        folders = {}
        for name, info in _infos(self.root).items():
            m = _ROUND.match(name)
            if m and info.type == pafs.FileType.Directory:
                index = int(m.group(1))
                folders[index] = self.root.is_local or _committed(self.round_path(index))
        return folders


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


# ---- committing a round ------------------------------------------------------------------------------------


def _commit_on_disk(root: Location, final: Location, files: dict[str, Callable]) -> None:
    """Write ``files`` and the manifest into ``.round_NNN.partial``, fsync, rename it to ``final``."""
    partial = root.local / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sizes = {}
    for name, write in files.items():
        with open(partial / name, "wb") as f:
            write(f)
            sizes[name] = f.tell()
    (partial / MANIFEST).write_text(_manifest(final, sizes))
    _fsync_tree(partial)
    os.rename(partial, final.local)
    _fsync_dir(root.local)  # the rename itself survives a crash of the machine


def _commit_in_object_store(root: Location, final: Location, files: dict[str, Callable]) -> None:
    """Write ``files`` straight into ``final`` (after deleting what an earlier attempt left), the manifest last."""
    final.delete()
    sizes = {}
    for name, write in files.items():
        where = final / name
        with where.errors("writing"), where.fs.open_output_stream(where.path) as f:  # visible once closed
            write(f)
            sizes[name] = f.tell()
    (final / MANIFEST).write_text(_manifest(final, sizes))


def _manifest(final: Location, sizes: dict[str, int]) -> str:
    return json.dumps({"round": int(_ROUND.match(final.name).group(1)), "files": sizes}, indent=1)


def _committed(folder: Location) -> bool:
    """Whether ``folder`` holds a manifest and every object it lists, at its size. A store that cannot be
    reached raises `StorageError` (a round is never taken for incomplete, and deleted, on a passing outage)."""
    listing = _listing(folder)
    if MANIFEST not in listing:
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        return all(listing.get(name) == int(size) for name, size in files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _infos(folder: Location) -> dict[str, pafs.FileInfo]:
    """What lies directly in ``folder``, by name ({} when it does not exist): one listing."""
    with folder.errors("listing"):
        infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return {info.base_name: info for info in infos}


def _listing(folder: Location) -> dict[str, int]:
    """``{name: size}`` of the files directly in ``folder``."""
    return {name: info.size for name, info in _infos(folder).items() if info.type == pafs.FileType.File}


def _read_table(file: Location) -> pa.Table:
    with file.errors("reading"):
        return pq.read_table(file.path, filesystem=file.fs)


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
