"""What every Ray Data actor of ray_dal does when it starts: its model, device and thread count."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ray
import torch

from .config import ModelConfig
from .models import build_model


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
