"""Loading and saving recipes: YAML + ``key=value`` overrides in, a checked ``RecipeConfig`` out, and back.

Loading is strict: an unknown key fails with a "Did you mean" hint, a value of the wrong type fails with the key's
name, every dataclass checks its own values, the model family and the optimizer are looked up in their registries
(``registry.py``, ``optim/__init__.py``), and the optimizer's learning rate is settled (``_settle_lr``). The schema
itself is ``config.py``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlplatform import optim, registry
from nlplatform.config import ModelConfig, OptimConfig, RecipeConfig
from nlplatform.errors import ConfigError
from nlplatform.secrets import mask
from nlplatform.validate import DERIVED, check_keys, instantiate, read_yaml


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"could not parse overrides {list(overrides)}: {exc}") from None


def _schema_for(raw: dict[str, Any]) -> RecipeConfig:
    """The default recipe whose ``model`` is the chosen family's config, filled with the chosen preset."""
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError("recipe key 'model' is a section; give its keys, e.g. model.name=transformer")
    name = model_raw.get("name", ModelConfig.name)
    preset = model_raw.get("preset", ModelConfig.preset)
    return RecipeConfig(model=registry.model_config(str(name), str(preset)))


def _derived(schema: RecipeConfig, raw: dict[str, Any]) -> dict[str, Any]:
    """The model fields derived from other recipe keys (``DERIVED``), with their values in ``raw``."""
    out = {}
    for f in fields(schema.model):
        if DERIVED in f.metadata:
            section, key = f.metadata[DERIVED].split(".")
            out[f.name] = (raw.get(section) or {}).get(key, getattr(getattr(schema, section), key))
    return out


def _from_raw(raw: dict[str, Any]) -> RecipeConfig:
    schema = _schema_for(raw)
    check_keys(raw, schema)
    optim_raw = raw.get("optim") or {}
    optim.check_name(str(optim_raw.get("name", OptimConfig.name)))
    if optim_raw.get("lr") is None:  # no rate given: the optimizer's own
        raw = {**raw, "optim": {**optim_raw, "lr": optim.default_lr(str(optim_raw.get("name", OptimConfig.name)))}}
    derived = _derived(schema, raw)
    if derived:  # set before the model's own checks run, so they see the real values
        raw = {**raw, "model": {**(raw.get("model") or {}), **derived}}
    cfg = instantiate(schema, raw)
    assert isinstance(cfg, RecipeConfig)
    return cfg


def _section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def _settle_lr(file_raw: dict[str, Any], override_raw: dict[str, Any]) -> dict[str, Any]:
    """A learning rate belongs to the optimizer it was written for. The recipe file's ``optim.lr`` was chosen for the
    file's ``optim.name`` (AdamW when it names none); when the command line switches to another optimizer without
    giving ``optim.lr`` too, that rate would be wrong by up to 100x (plain-gradient optimizers need about 30x AdamW's),
    so the new optimizer's default rate (``optim.DEFAULT_LR``) replaces it, and a line on stderr says so. Returns
    the overrides to apply."""
    file_optim, over_optim = _section(file_raw, "optim"), _section(override_raw, "optim")
    file_name = str(file_optim.get("name", OptimConfig.name))
    name = str(over_optim.get("name", file_name))
    if name == file_name or "lr" in over_optim or file_optim.get("lr") is None or name not in optim.OPTIMIZERS:
        return override_raw
    rate = optim.default_lr(name)
    given = f"the recipe's optim.lr={file_optim['lr']} is for {file_name}"
    print(f"optim.lr={rate:g}: {name}'s default rate ({given}; set optim.lr to choose)", file=sys.stderr)
    return {**override_raw, "optim": {**over_optim, "lr": rate}}


def _load_raw(path: str | Path, overrides: Sequence[str]) -> dict[str, Any]:
    """The recipe file merged with the overrides, as plain containers (keys and values not yet checked)."""
    file_raw = read_yaml(path, "recipe", examples="recipes/*/*.yaml")
    override_raw = _settle_lr(file_raw, _parse_overrides(overrides))
    return OmegaConf.to_container(OmegaConf.merge(file_raw, override_raw), resolve=True)  # type: ignore[return-value]


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate strictly, return the typed recipe."""
    return _from_raw(_load_raw(path, overrides))


def check_recipe_keys(path: str | Path, overrides: Sequence[str], keys: Iterable[str]) -> None:
    """Fail (with a "Did you mean") when a dotted key such as ``model.cms_chunk_sizes`` is not a key of the recipe
    ``path`` + ``overrides`` (whose model family decides the ``model.*`` keys). Only names are checked: a search
    space names keys before it has values for them."""
    raw = _load_raw(path, overrides)
    schema = _schema_for(raw)
    for key in keys:
        probe: dict[str, Any] = {}
        node = probe
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None
        check_keys(probe, schema)
        node = schema
        for i, part in enumerate(parents):
            node = getattr(node, part)
            if not is_dataclass(node):
                raise ConfigError(f"recipe key '{'.'.join(parents[: i + 1])}' is a value, not a section: '{key}'")
        if is_dataclass(getattr(node, leaf)):
            raise ConfigError(f"recipe key '{key}' is a section, not a value; name one of its keys")


# Keys that saved recipes may hold but the schema no longer has, and why they went: dropped when a saved recipe loads.
RETIRED_KEYS = {
    "model.context_len": "HOPE's training window is data.seq_len",  # a recipe key until it became DERIVED
}
_said_dropped: set[str] = set()


def _drop_unknown(raw: Any, schema: Any, prefix: str) -> list[str]:
    """Remove from ``raw`` (in place) the keys the dataclass ``schema`` does not declare; return their dotted names."""
    if not isinstance(raw, dict) or not is_dataclass(schema):
        return []
    known = {f.name for f in fields(schema) if DERIVED not in f.metadata}
    dropped = []
    for key in list(raw):
        if key not in known:
            dropped.append(f"{prefix}{key}")
            del raw[key]
        elif is_dataclass(getattr(schema, key)):
            dropped += _drop_unknown(raw[key], getattr(schema, key), f"{prefix}{key}.")
    return dropped


def recipe_from_dict(raw: dict[str, Any], saved: bool = False) -> RecipeConfig:
    """Rebuild a recipe saved with ``recipe_to_dict`` (checkpoints, run folders), with the same strict checks.
    ``saved``: the recipe was written by an earlier version, so keys the schema no longer has are dropped (said once
    per key on stderr, with the reason when ``RETIRED_KEYS`` knows it) instead of refused."""
    if saved:
        raw = copy.deepcopy(raw)
        for key in _drop_unknown(raw, _schema_for(raw), ""):
            if key not in _said_dropped:
                _said_dropped.add(key)
                why = RETIRED_KEYS.get(key, "not a key of this version")
                print(f"saved recipe: dropped {key} ({why})", file=sys.stderr)
    return _from_raw(raw)


def resumable_keys(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Dotted recipe keys whose field metadata lets them change on resume, with how (``RESUMABLE``,
    ``SAME_TOKENS_PER_STEP``)."""
    out: dict[str, str] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(resumable_keys(value, f"{prefix}{f.name}."))
        elif "resume" in f.metadata:
            out[f"{prefix}{f.name}"] = f.metadata["resume"]
    return out


def resume_differences(saved: dict[str, Any], cfg: RecipeConfig) -> list[str]:
    """``key: checkpoint X, now Y`` for every key of the resolved recipe ``cfg`` that differs from the checkpoint's
    saved recipe, except those the schema lets change on resume."""
    allowed = resumable_keys(cfg)
    old = flatten(recipe_to_dict(recipe_from_dict(saved, saved=True)))
    new = flatten(recipe_to_dict(cfg))
    return [
        f"{key}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
        for key in sorted(set(old) | set(new))
        if key not in allowed and old.get(key) != new.get(key)
    ]


def recipe_to_dict(cfg: RecipeConfig, *, masked: bool = False) -> dict[str, Any]:
    """The recipe as plain containers, without the derived model fields (they are not recipe keys). ``masked``: with
    the password of every URL in it masked (``nlplatform.secrets``), for everything written down (``recipe.yaml``,
    checkpoint hyperparameters); only the live recipe keeps it, to connect."""
    out: dict[str, Any] = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[assignment]
    for f in fields(cfg.model):
        if DERIVED in f.metadata:
            del out["model"][f.name]
    return _masked(out) if masked else out


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return mask(value) if isinstance(value, str) else value


def recipe_to_yaml(cfg: RecipeConfig) -> str:
    """The recipe as written into a run folder (passwords masked)."""
    return OmegaConf.to_yaml(OmegaConf.create(recipe_to_dict(cfg, masked=True)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the recipe as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
