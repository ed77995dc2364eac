"""Outer optimizers, built from the recipe's ``optim`` section.

AdamW is the default. The nested-learning optimizers (momentum as associative memory, delta momentum, DMGD, Muon,
M3) are added here as ``torch.optim.Optimizer`` subclasses; a recipe selects one with ``optim.name``.
"""

from __future__ import annotations

from typing import Any

import torch

from nlplatform.config import OptimConfig, _suggest
from nlplatform.errors import ConfigError

OPTIMIZERS = ("adamw",)


def check_name(name: str) -> None:
    """Raise a ConfigError with a suggestion unless ``name`` is an available optimizer."""
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"unknown optim.name {name!r}.{_suggest(name, OPTIMIZERS)} Available: {', '.join(OPTIMIZERS)}"
        )


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over ``param_groups`` (each group may carry its own lr / weight_decay)."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    check_name(cfg.name)
    raise AssertionError(f"optimizer {cfg.name!r} is listed but not built")
