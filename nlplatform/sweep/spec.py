"""The sweep file: its schema (``SweepFile``), the search space's distributions (``Param``), and the checks that run
before any trial does (``load_sweep``): the file's own keys and values, every searched key against the base recipe,
and the sampler's and pruner's options (by building them)."""

from __future__ import annotations

import json
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlplatform.errors import ConfigError
from nlplatform.recipe import check_recipe_keys, load_recipe
from nlplatform.validate import build, non_negative, one_of, read_yaml, suggest

OBJECTIVES = ("val_loss", "val_ppl", "train_loss", "tokens_per_sec")  # numeric figures of a run's summary
PRUNE_METRICS = {"val_loss": "val/loss", "val_ppl": "val/ppl", "train_loss": "train/loss"}
SAMPLERS = ("tpe", "random", "qmc", "gp", "cmaes")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
PARAM_TYPES = ("float", "int", "categorical", "ladder")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class ObjectiveSpec:
    metric: str = "val_loss"  # a figure of the trial's run summary: val_loss, val_ppl, train_loss, tokens_per_sec
    direction: str = "minimize"  # minimize | maximize

    def __post_init__(self) -> None:
        one_of("objective", "metric", self.metric, OBJECTIVES)
        one_of("objective", "direction", self.direction, ("minimize", "maximize"))


@dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | random | qmc | gp | cmaes (Optuna's samplers)
    seed: int | None = 0  # trial n draws from (seed, n): reproducible points, and no two trials share a stream
    options: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the Optuna sampler

    def __post_init__(self) -> None:
        one_of("sampler", "name", self.name, SAMPLERS)


@dataclass
class PrunerSpec:
    name: str = "median"  # none | median | percentile | successive_halving | hyperband (Optuna's pruners)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna pruner, e.g.
    # n_startup_trials / n_warmup_steps (median); steps are optimizer steps (the trials report at every validation)

    def __post_init__(self) -> None:
        one_of("pruner", "name", self.name, PRUNERS)


@dataclass
class HeartbeatSpec:
    """How a trial whose worker died (killed, node lost) is noticed and run again. A running trial writes a heartbeat
    to the storage every ``interval_s``; one silent for ``grace_period_s`` is marked failed by the next worker that
    starts a trial (on any machine) and queued again with the same parameters, up to ``retries`` times (Optuna's
    ``RetryFailedTrialCallback``). A trial that fails by raising is not retried: it would fail again."""

    interval_s: int = 60
    grace_period_s: int = 180  # > interval_s: a slow heartbeat write must not fail a live trial
    retries: int = 2

    def __post_init__(self) -> None:
        if self.interval_s < 1 or self.grace_period_s <= self.interval_s or self.retries < 0:
            raise ConfigError(
                "heartbeat needs interval_s >= 1, grace_period_s > interval_s and retries >= 0, got "
                f"{self.interval_s}, {self.grace_period_s}, {self.retries}"
            )


@dataclass
class SweepFile:
    recipe: str = ""  # the base recipe every trial starts from
    name: str | None = None  # the study name (default: the file's stem); fixed, so calls continue one study
    experiment: str | None = None  # MLflow experiment and runs/<experiment>/ folder (default: sweep-<name>)
    overrides: list[str] = field(default_factory=list)  # key=value applied to every trial before its own values
    space: dict[str, Any] = field(default_factory=dict)  # recipe key -> distribution (see the module docstring)
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    n_trials: int = 10  # the study's trial budget: a call runs the trials still missing (--n-trials N adds N)
    storage: str | None = None  # Optuna storage URL (default sqlite:///sweeps.db; --storage overrides)
    enqueue: list[dict[str, Any]] = field(default_factory=list)  # trials to run first, e.g. the recipe's own values
    heartbeat: HeartbeatSpec = field(default_factory=HeartbeatSpec)

    def __post_init__(self) -> None:
        non_negative("sweep", n_trials=self.n_trials)


@dataclass
class Param:
    """One searched recipe key: a float / int / categorical distribution, or a ladder of chunk sizes built from
    three such distributions (or fixed values): ``[base * ratio**i for i in range(levels)]``."""

    key: str
    kind: str
    spec: dict[str, Any]
    parts: dict[str, Param | Any] = field(default_factory=dict)  # ladder: levels, base, ratio

    def suggest(self, trial) -> Any:
        if self.kind == "ladder":
            levels, base, ratio = (
                p.suggest(trial) if isinstance(p, Param) else p for p in (self.parts[k] for k in LADDER_PARTS)
            )
            return [int(base * ratio**i) for i in range(levels)]
        if self.kind == "categorical":
            choices = self.spec["choices"]
            if all(_plain(c) for c in choices):
                return trial.suggest_categorical(self.key, choices)
            labels = [json.dumps(c) for c in choices]  # Optuna stores plain values only: lists go in as JSON
            return json.loads(trial.suggest_categorical(self.key, labels))
        opts = {k: self.spec[k] for k in ("step", "log") if k in self.spec}
        suggest = trial.suggest_float if self.kind == "float" else trial.suggest_int
        return suggest(self.key, self.spec["low"], self.spec["high"], **opts)


LADDER_PARTS = ("levels", "base", "ratio")


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _parse_param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: give a distribution ({{type: float|int|categorical|ladder, ...}}) or a list")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{where}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}.{suggest(str(kind), PARAM_TYPES)}"
        )
    allowed = {
        "float": {"type", "low", "high", "log", "step"},
        "int": {"type", "low", "high", "log", "step"},
        "categorical": {"type", "choices"},
        "ladder": {"type", *LADDER_PARTS},
    }[kind]
    for name in spec:
        if name not in allowed:
            raise ConfigError(f"{where}: unknown field '{name}' for type {kind}.{suggest(name, allowed)}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        return Param(key, kind, spec)
    if kind == "ladder":
        parts: dict[str, Param | Any] = {}
        for name in LADDER_PARTS:
            if name not in spec:
                raise ConfigError(f"{where}: a ladder needs levels, base and ratio (each a number or a distribution)")
            value = spec[name]
            parts[name] = _parse_param(f"{key}.{name}", value) if isinstance(value, (dict, list)) else value
            if isinstance(parts[name], Param) and parts[name].kind not in ("int", "categorical"):
                raise ConfigError(f"{where}.{name}: a ladder part is an int or categorical distribution")
        return Param(key, kind, spec, parts)
    for name in ("low", "high"):
        if not isinstance(spec.get(name), (int, float)) or isinstance(spec.get(name), bool):
            raise ConfigError(f"{where}: {kind} needs numeric low and high")
    if spec["low"] > spec["high"]:
        raise ConfigError(f"{where}: low ({spec['low']}) is above high ({spec['high']})")
    if kind == "int" and not all(isinstance(spec[n], int) for n in ("low", "high")):
        raise ConfigError(f"{where}: int needs integer low and high")
    if spec.get("log") and spec["low"] <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0")
    return Param(key, kind, spec)


@dataclass
class Sweep:
    """A checked sweep file."""

    path: Path
    file: SweepFile
    params: list[Param]

    @property
    def name(self) -> str:
        return self.file.name or self.path.stem

    @property
    def experiment(self) -> str:
        return self.file.experiment or f"sweep-{self.name}"

    def trial_overrides(self, values: dict[str, Any], number: int) -> list[str]:
        """The trial's overrides: the fixed ones, the trial's values, where its run goes."""
        return [
            *self.file.overrides,
            *(f"{key}={format_value(value)}" for key, value in values.items()),
            f"tracking.experiment={self.experiment}",
            f"tracking.run_name={self.name}-trial{number:04d}",
        ]

    def command(self, overrides: list[str]) -> str:
        return shlex.join(["nlplatform", "train", str(self.file.recipe), *overrides])


def format_value(value: Any) -> str:
    """A value as the right-hand side of a key=value override (YAML: lists in brackets, true/false, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file: its own keys, the search space, and that every searched key exists in the base
    recipe (all before any trial runs). Raises ConfigError (exit 2) on any problem."""
    path = Path(path)
    raw = read_yaml(path, "sweep", examples="sweeps/*.yaml")
    try:
        spec = build(SweepFile(), raw, "sweep key")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    assert isinstance(spec, SweepFile)
    sweep = Sweep(path, spec, [_parse_param(k, v) for k, v in spec.space.items()])
    _check_sweep(sweep)
    return sweep


def _check_sweep(sweep: Sweep) -> None:
    f = sweep.file
    if not f.recipe:
        raise ConfigError(f"{sweep.path}: 'recipe' is missing (the base recipe, e.g. recipes/hope/tiny.yaml)")
    if not sweep.params:
        raise ConfigError(f"{sweep.path}: the search space is empty; give at least one key under 'space:'")
    for label, value in (("name", sweep.name), ("experiment", sweep.experiment)):
        if not _NAME.fullmatch(value):
            raise ConfigError(f"{sweep.path}: {label} must be a plain name (letters, digits, . _ -), got {value!r}")
    base = Path(f.recipe)
    load_recipe(base, f.overrides)  # the base recipe and the fixed overrides, values included
    keys = [p.key for p in sweep.params]
    for key in keys:
        if key.split(".")[0] == "tracking":
            raise ConfigError(f"{sweep.path}: space.{key}: the sweep decides where trials are tracked")
    check_recipe_keys(base, f.overrides, keys)
    for i, trial in enumerate(f.enqueue):
        unknown = [k for k in trial if k not in keys and not any(k.startswith(f"{p}.") for p in keys)]
        if unknown:
            raise ConfigError(f"{sweep.path}: enqueue[{i}] sets {unknown[0]!r}, which the space does not search")
    build_sampler(f.sampler)
    build_pruner(f.pruner)


def _construct(kind: str, name: str, cls, options: dict[str, Any], **fixed: Any):
    """``cls(**fixed, **options)``, with a bad option reported as bad input rather than a traceback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices
            return cls(**fixed, **options)
    except (TypeError, ValueError, ImportError) as exc:
        raise ConfigError(f"{kind} {name} with options {options}: {str(exc).splitlines()[0]}") from None


def seed_for_trial(sampler, seed: int, number: int) -> None:
    """Reseed the sampler's random state from (sweep seed, trial number) before the trial draws its values.

    A seeded Optuna sampler otherwise replays the same random start-up points in every process that builds it: a
    continued study, each parallel worker and each machine sharing the storage would propose the first call's
    points again. Trial numbers are unique in a study (the storage assigns them), so every trial gets its own
    stream, and a trial's draws depend only on the seed, its number and the history it sees. Samplers without a
    numpy random state (QMC takes its points by trial number anyway) are left alone."""
    for part in (sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None)):
        state = getattr(part, "_rng", None)
        if state is not None and hasattr(state, "rng"):
            state.rng.seed((seed + 7919 * number) % 2**32)


def build_sampler(spec: SamplerSpec):
    import optuna

    classes = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "qmc": optuna.samplers.QMCSampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }
    return _construct("sampler", spec.name, classes[spec.name], spec.options, seed=spec.seed)


def build_pruner(spec: PrunerSpec):
    import optuna

    classes = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
    }
    return _construct("pruner", spec.name, classes[spec.name], spec.options)
