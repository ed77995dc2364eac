"""Checking what a person typed: one home for every schema's validation.

Recipes (``config.py``), sweep files (``sweep/spec.py``), eval suites, the command line's names and the model
families all check their input here, so an unknown name always gets the same "Did you mean" hint and a bad value the
same one-line message. This module imports nothing of the project but its errors, so anything may use it.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Collection, Iterable
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlplatform.errors import ConfigError

# Field metadata of a dataclass field whose value follows from another key of the same document, e.g.
# ``{"derived": "data.seq_len"}``: it is not a key a person writes, so it is refused in files and left out of the
# names offered as suggestions.
DERIVED = "derived"


def suggest(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``candidates`` (empty when none is close): the tail of a message."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def check_name(value: str, known: Collection[str], what: str, listing: str = "Known") -> None:
    """Refuse ``value`` unless it is one of ``known``: ``unknown <what> 'x'. Did you mean ...? <listing>: ...``."""
    if value not in known:
        names = ", ".join(map(str, known))
        raise ConfigError(f"unknown {what} {value!r}.{suggest(value, known)} {listing}: {names}")


def positive(section: str, **values: float | int | None) -> None:
    """Each value None or a finite number > 0 (nan and inf are refused: nan compares false with everything)."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{section}.{name} must be > 0, got {value}")


def non_negative(section: str, **values: float | int | None) -> None:
    """Each value None or a finite number >= 0."""
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{section}.{name} must be >= 0, got {value}")


def in_range(
    section: str, name: str, value: float, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    """``low <= value <= high`` (``open_*``: strict at that end), else ``section.name must be in [low, high]``."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ConfigError(f"{section}.{name} must be in {interval}, got {value}")


def one_of(section: str, name: str, value: Any, allowed: Collection[Any]) -> None:
    """``value`` is one of ``allowed``, else ``section.name must be one of a, b, got 'x'. Did you mean ...``."""
    if value not in allowed:
        raise ConfigError(
            f"{section}.{name} must be one of {', '.join(map(str, allowed))}, got {value!r}.{suggest(value, allowed)}"
        )


def check_keys(raw: Any, schema: Any, prefix: str = "", what: str = "recipe key") -> None:
    """Fail on the first key of ``raw`` (nested dicts) that the dataclass ``schema`` does not declare, with a
    suggestion among the keys it does; a derived field or a section given a plain value is refused by name."""
    if not isinstance(raw, dict) or not is_dataclass(schema):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            names = [f"{prefix}{k}" for k, f in known.items() if DERIVED not in f.metadata]
            raise ConfigError(f"unknown {what} '{path}'.{suggest(path, names)}")
        if DERIVED in known[key].metadata:
            source = known[key].metadata[DERIVED]
            raise ConfigError(f"{what} '{path}' is not set in recipes: it is {source}; set {source} instead")
        child = getattr(schema, key)
        if is_dataclass(child):
            if not isinstance(value, dict):
                raise ConfigError(f"{what} '{path}' is a section; give its keys, e.g. {path}.<key>=...")
            check_keys(value, child, f"{path}.", what)


def read_yaml(path: str | Path, what: str, examples: str | None = None) -> dict[str, Any]:
    """The YAML mapping in ``path`` as plain containers; a folder, a missing file, bad YAML or a document that is not
    a mapping is one ``ConfigError`` line (``examples``: files of this kind, named in the message when ``path`` is
    missing, with the closest one suggested)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("**/*.yaml"))[:8]
        raise ConfigError(
            f"{what} {path} is a folder; give a {what} file" + (f", e.g. {', '.join(inside)}" if inside else "")
        )
    if not path.is_file():
        found = sorted(str(p) for p in Path().glob(examples)) if examples else []
        hint = suggest(str(path), found) or (f" {what.capitalize()}s: {', '.join(found)}" if found else "")
        raise ConfigError(f"{what} file not found: {path}.{hint}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError, UnicodeDecodeError, ...
        raise ConfigError(f"{what} {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None or not isinstance(loaded, DictConfig):
        raise ConfigError(f"{what} {path} must be a mapping of keys to values")
    return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]


def build(schema: Any, raw: dict[str, Any], what: str = "recipe key") -> Any:
    """The dataclass instance ``schema`` (an instance holding the defaults) updated with ``raw``, strictly: unknown
    keys (``check_keys``), values of the wrong type (named by key) and the dataclasses' own ``__post_init__`` checks
    each fail with one ``ConfigError`` line."""
    check_keys(raw, schema, "", what)
    return instantiate(schema, raw, what)


def instantiate(schema: Any, raw: dict[str, Any], what: str = "recipe key") -> Any:
    """``build`` without the key check, for a caller that checked the keys before adding some of its own."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        if isinstance(exc.__cause__, ConfigError):  # a __post_init__ check, wrapped by OmegaConf
            raise exc.__cause__ from None
        key = getattr(exc, "full_key", None)
        message = str(exc).splitlines()[0]
        raise ConfigError(f"{what} '{key}': {message}" if key else f"invalid {what.split()[0]}: {message}") from None
