"""What every Ray Data actor of ray_dal does when it starts: its model, device and thread count."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Mapping

import ray
import torch

from ..config import ModelConfig, ScoringConfig
from ..errors import WeightsError
from ..models import build_model
from ..storage import Location, location
from .runtime import cluster_has_gpus
from .scorer_pool import Actors


def model_config(model_cfg: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """A `ModelConfig` from itself or a mapping of some of its fields (the rest take their defaults)."""
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    try:
        return ModelConfig(**model_cfg)
    except TypeError:
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        raise ValueError(f"model_cfg {dict(model_cfg)} has keys other than ModelConfig's fields {fields}") from None


def resolve(value: Any) -> Any:
    """``ray.get`` an ObjectRef; pass anything else through (lets an actor class run outside Ray)."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def load_model(model_cfg: ModelConfig | Mapping[str, Any], state_dict: Any, device: torch.device | str = "cpu"):
    """``build_model`` with ``state_dict`` (or its ObjectRef) loaded strictly, in eval mode, on ``device``."""
    cfg = model_config(model_cfg)
    model = build_model(cfg.name, cfg.num_classes, cfg.in_channels)
    model.load_state_dict(resolve(state_dict))
    return model.to(device).eval()


def load_weights_file(path: str | Path | Location, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; `WeightsError` naming the file, the reason and ``fix``.

    ``path``: a local path or a URI (``s3://...``, `ray_dal.storage.location`; a store that cannot be
    reached is a `StorageError`). weights_only refuses pickled code (a callable, any object but tensors
    and plain containers), so loading a file can never run it.
    """
    where = location(path)
    if not where.is_file():
        raise WeightsError(f"weights file {where.uri!r} does not exist. {fix}")
    source = where.local if where.is_local else io.BytesIO(where.read_bytes())
    path = where.uri
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "nsupported" in line), lines[0])
        if "Weights only load failed" in lines[0]:
            reason = f"it holds objects other than tensors, which could run code when unpickled ({reason})"
        raise WeightsError(f"cannot load {path} as plain weights (torch.load with weights_only=True): {reason}. "
                           f"{fix}") from None


def check_weights(model_cfg: ModelConfig | Mapping[str, Any], state_dict: Any, source: str) -> dict[str, torch.Tensor]:
    """``state_dict`` if it loads strictly into the model of ``model_cfg`` and is finite, else `WeightsError`.

    ``source`` names the weights in the message (a path, "state_dict", ...). Runs on the driver, so a
    bad checkpoint fails before any worker starts.
    """
    cfg = model_config(model_cfg)
    model_desc = f"model {cfg.name!r} (num_classes={cfg.num_classes}, in_channels={cfg.in_channels})"
    fix = "Fix: use the model settings the weights were trained with (model.name/num_classes/in_channels)"
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        keys = sorted(state_dict)[:5] if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise WeightsError(f"{source} is not a state_dict (a mapping of parameter names to tensors; got {keys}). "
                           "Fix: save model.state_dict(), e.g. a run's round_NNN/model.pt")
    try:
        build_model(cfg.name, cfg.num_classes, cfg.in_channels).load_state_dict(state_dict)
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        raise WeightsError(f"{source} does not fit {model_desc}: {detail}. {fix}") from None
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise WeightsError(f"{source} holds NaN or infinite values in {bad[:10]}: the model diverged or the file "
                           "is corrupt. Fix: use an earlier checkpoint, or retrain with a lower train.lr")
    return dict(state_dict)


def scorer_gpus(scoring_cfg: ScoringConfig) -> float:
    """GPUs per pool actor: ``scoring.gpus_per_scorer``, or (None) 1 when the cluster has GPUs, else 0."""
    if scoring_cfg.gpus_per_scorer is not None:
        return scoring_cfg.gpus_per_scorer
    return 1 if cluster_has_gpus() else 0


def scorer_actors(scoring_cfg: ScoringConfig) -> Actors:
    """The pool passes' actors: ``scoring.num_scorers`` of them, each reserving ``cpus_per_scorer`` CPUs and
    `scorer_gpus` GPUs, living ``scorer_lifetime`` (`ray_dal.pipeline.scorer_pool`)."""
    return Actors(scoring_cfg.num_scorers, scoring_cfg.cpus_per_scorer, scorer_gpus(scoring_cfg),
                  scoring_cfg.scorer_lifetime)


def actor_device(use_gpu: bool = True) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def use_cpu_share() -> None:
    """Set torch's threads to the whole CPUs this Ray actor reserved (at least 1)."""
    torch.set_num_threads(cpu_share())


def cpu_share() -> int:
    """Whole CPUs this Ray actor reserved (at least 1); torch's current thread count outside Ray."""
    if ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus is not None:
            return max(1, int(cpus))
    return max(1, torch.get_num_threads())
