"""Model registry: an explicit, greppable table from ``model.name`` to the module that defines the family.

Each family module defines ``SPECS``, a list of ``ModelSpec(name, config_cls, model_cls, presets)``: one per family
it holds (``deltanet.py`` holds DeltaNet and Gated DeltaNet, which share their layer). Family modules are imported
only when a recipe asks for them.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

from torch import nn

from nlplatform.config import ModelConfig
from nlplatform.errors import ConfigError, UserError
from nlplatform.models.base import ModelSpec
from nlplatform.validate import check_name, suggest

FAMILIES: dict[str, str] = {
    "transformer": "nlplatform.models.transformer",
    "deltanet": "nlplatform.models.deltanet",
    "gated_deltanet": "nlplatform.models.deltanet",
    "titans": "nlplatform.models.titans",
    "hope": "nlplatform.models.hope",
}


def get_spec(name: str) -> ModelSpec:
    check_name(name, FAMILIES, "model.name")
    module = importlib.import_module(FAMILIES[name])
    return next(spec for spec in module.SPECS if spec.name == name)


def model_config(name: str, preset: str, **overrides: Any) -> ModelConfig:
    """The family's config for ``preset``, with ``overrides`` applied (validated by its ``__post_init__``)."""
    spec = get_spec(name)
    if preset not in spec.presets:
        raise ConfigError(
            f"unknown model.preset {preset!r} for {name}.{suggest(preset, spec.presets)} "
            f"Presets: {', '.join(spec.presets)}"
        )
    known = {f.name for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown key model.{unknown[0]} for {name}.{suggest(unknown[0], known)}")
    return spec.config_cls(**{**spec.presets[preset], **overrides, "name": name, "preset": preset})


def config_from_fields(fields: dict[str, Any]) -> ModelConfig:
    """A family's config from all of its fields as ``dataclasses.asdict`` wrote them (``name`` and ``preset``
    included): how an exported model folder keeps it."""
    rest = {k: v for k, v in fields.items() if k not in ("name", "preset")}
    return model_config(fields["name"], fields["preset"], **rest)


def check_model_format(name: str, saved: int | None, source: str) -> None:
    """Refuse a checkpoint whose weights were trained for another version of the family's math (``saved``: its
    ``model_format``; None for checkpoints from before the field, which are format 1)."""
    spec = get_spec(name)
    saved = 1 if saved is None else int(saved)
    if saved != spec.format_version:
        raise UserError(
            f"{source} holds a {name} model of format {saved}, but this version computes format "
            f"{spec.format_version}: {spec.format_change or 'the model changed'}. Its weights cannot be reused; "
            "train it again"
        )


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model of ``cfg`` (call under ``torch.device("meta")`` to size paper presets without memory)."""
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is unset: set it, or let the training data fill it from the tokenizer")
    return get_spec(cfg.name).model_cls(cfg)
