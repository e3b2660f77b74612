"""Experiment configuration: dataclasses are the one source of truth for defaults; YAML overrides them.

A YAML file mirrors the sections below (``data:``, ``model:``, ``train:``, ``scoring:``, ``loop:``,
``runtime:``); unknown keys are an error that names the key and the valid ones. Files are read
with ``yaml.safe_load``: a config can never make the job execute code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .storage import Location, location

TOP_B_STRATEGIES = ("dynamic", "random", "entropy", "margin", "confidence")  # a score per sample; the top b
DIVERSITY_STRATEGIES = ("coreset", "badge", "albl")  # a batch chosen jointly from embedded candidates
STRATEGIES = TOP_B_STRATEGIES + DIVERSITY_STRATEGIES
DECODE_LAYOUTS = ("auto", "actors", "tasks")  # scoring.decode (ray_dal/pipeline/decode.py)
SCORER_LIFETIMES = ("run", "pass")  # scoring.scorer_lifetime (ray_dal/pipeline/scorer_pool.py)


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it and the fix."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | svhn | caltech101 (ray_dal/data/datasets.py)
    data_dir: str = "~/.cache/ray_dal/cifar10"  # Parquet pool, torchvision layout, ImageFolder, or download target
    image_size: int | list[int] | None = None  # H = W, or [H, W]: resize every image to it (None: the dataset's)
    pool_size: int | None = None  # seeded subsample of the training pool (None: all of it)
    test_size: int | None = None  # seeded subsample of the test set (None: all of it)
    on_bad_image: str = "fail"  # "fail" (list the bad ids) or "skip" (score without them, report ids)
    classes: list[str] | None = None  # class names, label i = classes[i] (None: 0..K-1); sets model.num_classes


@dataclass
class ModelConfig:
    name: str = "cnn"
    num_classes: int = 10
    in_channels: int = 3


@dataclass
class TrainConfig:
    """``num_workers: auto`` trains where a round is cheapest: in the driver when training would use no GPU
    (no Ray Train start-up per round; a killed run resumes from its last completed round), on
    one Ray Train GPU worker otherwise (active learning's labeled sets are small; give a count for DDP).
    Every round's ``train_workers`` metric says which was used (0: the driver)."""

    max_epochs: int = 100  # a round ends after this many epochs ...
    train_accuracy: float | None = 0.99  # ... or once training accuracy reaches this (None: epochs only)
    lr: float = 1e-3  # Adam, fresh each round
    batch_size: int = 128
    num_workers: int | str = "auto"  # Ray Train workers (data parallel); 0: in the driver; "auto": above
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 0.5  # leaves headroom for Ray Data's read tasks on small machines
    checkpoint_every_s: float = 30.0  # report + checkpoint at most this often (and at a round's end); 0: every epoch


@dataclass
class ScoringConfig:
    strategy: str = "dynamic"
    gamma: float = 2.0
    scope: str = "all"  # "all" parameters or the "last" linear layer
    num_scorers: int = 2  # scorer actors
    batch_size: int = 256
    cpus_per_scorer: float = 0.5
    gpus_per_scorer: float | None = None  # None: 1 per actor when the cluster has GPUs, else 0
    decode: str = "auto"  # "actors" | "tasks" (CPU map tasks ahead of the scorers) | "auto": tasks with GPU scorers
    scorer_lifetime: str = "run"  # "run": the scorer actors start once and serve every pass; "pass": one pool a pass
    candidates: int | None = 100_000  # coreset/badge/albl: seeded subsample of the unlabeled pool (None: all)


@dataclass
class LoopConfig:
    initial: int = 500  # M, size of the seeded initial labeled set
    budget: int = 250  # b, samples queried per round
    rounds: int = 10  # R queries; round R only trains and evaluates
    seed: int = 0
    out: str = "runs/cifar10"
    labels: str | None = None  # None: the dataset's labels are the oracle (simulation); else the (id, label) file
    # of the latest `ray-dal round`, whose labels come from people (then initial and rounds are unused)


@dataclass
class RuntimeConfig:
    num_cpus: int | None = None  # embedded local Ray only; ignored when joining a cluster
    no_progress_timeout_s: float = 600.0  # fail a Ray Data stage that makes no progress this long


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known_keys(values: Any, valid: set[str], what: str) -> None:
    """Raise unless ``values`` is a mapping whose keys are all in ``valid``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{what} must be a mapping, got {type(values).__name__}")
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {what}; valid keys: {sorted(valid)}")


def _merge(section: Any, values: Mapping[str, Any], where: str) -> Any:
    _known_keys(values, {f.name for f in dataclasses.fields(section)}, where)
    return dataclasses.replace(section, **values)


def from_dict(values: Mapping[str, Any] | None) -> ExperimentConfig:
    """Build a validated config from nested mappings (as YAML gives them) over the defaults."""
    cfg = ExperimentConfig()
    values = {} if values is None else values
    _known_keys(values, {f.name for f in dataclasses.fields(cfg)}, "the config's sections")
    for name, section_values in values.items():
        setattr(cfg, name, _merge(getattr(cfg, name), section_values, f"section '{name}'"))
    if isinstance(cfg.data.classes, list) and "num_classes" not in (values.get("model") or {}):
        cfg.model.num_classes = len(cfg.data.classes)  # class names given: they say how many classes there are
    validate(cfg)
    return cfg


def load_config(path: "str | Path | Location | None" = None,
                overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Defaults, then the YAML file at ``path`` (a local path or a URI), then ``overrides`` (``{"section.key": value}``)."""
    values: dict[str, Any] = {}
    if path is not None:
        where = location(path)
        if not where.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.safe_load(where.read_text()) or {}
        except yaml.YAMLError as error:  # includes !!python tags, which safe_load never constructs
            raise ConfigError(f"config file {str(path)!r} is not plain YAML data: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must look like 'section.key'")
        values.setdefault(section, {})
        if not isinstance(values[section], dict):
            raise ConfigError(f"section '{section}' must be a mapping")
        values[section][key] = value
    return from_dict(values)


def save_config(cfg: ExperimentConfig, path: "str | Path | Location") -> None:
    """Write ``cfg`` as YAML to ``path`` (a local path or a URI), all at once."""
    location(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need no data: ranges and choices. Raises `ConfigError` naming the key."""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is invalid: {rule}")

    s, t, lp = cfg.scoring, cfg.train, cfg.loop
    need(s.strategy in STRATEGIES, "scoring.strategy", s.strategy, f"choose one of {list(STRATEGIES)}")
    need(s.scope in ("all", "last"), "scoring.scope", s.scope, "choose 'all' or 'last'")
    need(float(s.gamma) >= 0, "scoring.gamma", s.gamma, "must be >= 0 (inf for the influence variant)")
    need(s.num_scorers >= 1, "scoring.num_scorers", s.num_scorers, "must be >= 1")
    need(s.batch_size >= 1, "scoring.batch_size", s.batch_size, "must be >= 1")
    need(s.decode in DECODE_LAYOUTS, "scoring.decode", s.decode, f"choose one of {list(DECODE_LAYOUTS)}")
    need(s.scorer_lifetime in SCORER_LIFETIMES, "scoring.scorer_lifetime", s.scorer_lifetime,
         f"choose one of {list(SCORER_LIFETIMES)}")
    need(s.candidates is None or s.candidates >= 1, "scoring.candidates", s.candidates, "must be >= 1 or null")
    need(t.max_epochs >= 1, "train.max_epochs", t.max_epochs, "must be >= 1")
    need(t.train_accuracy is None or 0 < t.train_accuracy <= 1, "train.train_accuracy", t.train_accuracy,
         "must be in (0, 1] or null")
    need(t.lr > 0, "train.lr", t.lr, "must be > 0")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
    need(t.checkpoint_every_s >= 0, "train.checkpoint_every_s", t.checkpoint_every_s, "must be >= 0")
    need(t.num_workers == "auto" or (isinstance(t.num_workers, int) and not isinstance(t.num_workers, bool)
                                     and t.num_workers >= 0), "train.num_workers", t.num_workers,
         "give an int >= 0 (0 trains in the driver) or 'auto' (the driver without GPUs, else one GPU worker)")
    need(lp.initial >= 1, "loop.initial", lp.initial, "must be >= 1")
    need(lp.budget >= 1, "loop.budget", lp.budget, "must be >= 1")
    need(lp.rounds >= 0, "loop.rounds", lp.rounds, "must be >= 0")
    need(cfg.data.on_bad_image in ("fail", "skip"), "data.on_bad_image", cfg.data.on_bad_image,
         "choose 'fail' or 'skip'")
    size = cfg.data.image_size
    sides = [size] if isinstance(size, int) else size if isinstance(size, (list, tuple)) and len(size) == 2 else [0]
    need(size is None or all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sides),
         "data.image_size", size, "give one int >= 1 (square), [height, width], or null (the dataset's size)")
    need(cfg.model.num_classes >= 2, "model.num_classes", cfg.model.num_classes, "must be >= 2")
    names = cfg.data.classes
    if names is not None:
        need(isinstance(names, list) and all(isinstance(n, str) and n.strip() == n and n for n in names),
             "data.classes", names, "give a list of non-empty class names without surrounding spaces")
        need(len(set(names)) == len(names), "data.classes", names, "class names must be distinct")
        need(len(names) == cfg.model.num_classes, "data.classes", names,
             f"it names {len(names)} classes but model.num_classes = {cfg.model.num_classes}; make them agree")
    need(cfg.runtime.no_progress_timeout_s > 0, "runtime.no_progress_timeout_s",
         cfg.runtime.no_progress_timeout_s, "must be > 0")
