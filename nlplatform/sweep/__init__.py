"""Optuna sweeps over recipe keys: ``nlplatform sweep SWEEP.yaml [--n-trials N] [--storage URL] [--workers K]``.

A sweep file (``sweeps/*.yaml``) names a base recipe, fixed overrides, a search space over any recipe key, the
objective and the search machinery::

    recipe: recipes/hope/tiny.yaml
    overrides: [trainer.max_steps=40]            # every trial; the same key=value strings `nlplatform train` takes
    objective: {metric: val_loss, direction: minimize}
    space:
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      model.memory_chunk_size: [8, 16, 32]       # a plain list is a categorical choice
      model.cms_chunk_sizes:                     # a ladder: base * ratio^i for i < levels
        {type: ladder, levels: {type: int, low: 1, high: 3}, base: [32, 64], ratio: [2, 4]}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 20}
    n_trials: 8
    heartbeat: {interval_s: 60, grace_period_s: 180, retries: 2}   # a killed worker's trial is failed, then rerun

Each trial becomes ``key=value`` overrides of the same strict recipe loader a manual run uses, so any trial is
reproduced by the ``nlplatform train`` command the study prints. The study lives in persistent Optuna storage
(``sqlite:///sweeps.db`` by default, any SQLAlchemy URL for many machines) under a name fixed by the sweep file, so a
second call continues it. MLflow gets one parent run per study (the sweep file, the plots) with one nested run per
trial (the trial's own training run). Pruning reports the validation loss at ``trainer.global_step``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import multiprocessing
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nlplatform.config import ConfigError, _check_keys, check_recipe_keys, load_recipe
from nlplatform.errors import UserError, one_line
from nlplatform.secrets import mask

DEFAULT_STORAGE = "sqlite:///sweeps.db"
OBJECTIVES = ("val_loss", "val_ppl", "train_loss", "tokens_per_sec")  # numeric figures of a run's summary
PRUNE_METRICS = {"val_loss": "val/loss", "val_ppl": "val/ppl", "train_loss": "train/loss"}
SAMPLERS = ("tpe", "random", "qmc", "gp", "cmaes")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband")
PARAM_TYPES = ("float", "int", "categorical", "ladder")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------------------------- the file


@dataclass
class ObjectiveSpec:
    metric: str = "val_loss"  # a figure of the trial's run summary: val_loss, val_ppl, train_loss, tokens_per_sec
    direction: str = "minimize"  # minimize | maximize


@dataclass
class SamplerSpec:
    name: str = "tpe"  # tpe | random | qmc | gp | cmaes (Optuna's samplers)
    seed: int | None = 0  # trial n draws from (seed, n): reproducible points, and no two trials share a stream
    options: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the Optuna sampler


@dataclass
class PrunerSpec:
    name: str = "median"  # none | median | percentile | successive_halving | hyperband (Optuna's pruners)
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Optuna pruner, e.g.
    # n_startup_trials / n_warmup_steps (median); steps are optimizer steps (the trials report at every validation)


@dataclass
class HeartbeatSpec:
    """How a trial whose worker died (killed, node lost) is noticed and run again. A running trial writes a heartbeat
    to the storage every ``interval_s``; one silent for ``grace_period_s`` is marked failed by the next worker that
    starts a trial (on any machine) and queued again with the same parameters, up to ``retries`` times (Optuna's
    ``RetryFailedTrialCallback``). A trial that fails by raising is not retried: it would fail again."""

    interval_s: int = 60
    grace_period_s: int = 180  # > interval_s: a slow heartbeat write must not fail a live trial
    retries: int = 2


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


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _parse_param(key: str, spec: Any) -> Param:
    where = f"space.{key}"
    if isinstance(spec, list):
        spec = {"type": "categorical", "choices": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: give a distribution ({{type: float|int|categorical|ladder, ...}}) or a list")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(
            f"{where}.type must be one of {', '.join(PARAM_TYPES)}, got {kind!r}.{_suggest(str(kind), PARAM_TYPES)}"
        )
    allowed = {
        "float": {"type", "low", "high", "log", "step"},
        "int": {"type", "low", "high", "log", "step"},
        "categorical": {"type", "choices"},
        "ladder": {"type", *LADDER_PARTS},
    }[kind]
    for name in spec:
        if name not in allowed:
            raise ConfigError(f"{where}: unknown field '{name}' for type {kind}.{_suggest(name, allowed)}")
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
    if not path.is_file():
        found = sorted(str(p) for p in Path("sweeps").glob("*.yaml")) if Path("sweeps").is_dir() else []
        hint = _suggest(str(path), found) or (f" Sweeps: {', '.join(found)}" if found else "")
        raise ConfigError(f"sweep file not found: {path}.{hint}")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"sweep {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"sweep {path} must be a mapping (recipe:, space:, ...)")
    raw = OmegaConf.to_container(raw, resolve=True)
    try:
        _check_keys(raw, SweepFile(), "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {str(exc).replace('recipe key', 'sweep key')}") from None
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepFile), raw))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: sweep key '{getattr(exc, 'full_key', '?')}': {str(exc).splitlines()[0]}") from None
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
    if f.objective.metric not in OBJECTIVES:
        raise ConfigError(
            f"{sweep.path}: objective.metric must be one of {', '.join(OBJECTIVES)}, got {f.objective.metric!r}."
            f"{_suggest(f.objective.metric, OBJECTIVES)}"
        )
    if f.objective.direction not in ("minimize", "maximize"):
        raise ConfigError(f"{sweep.path}: objective.direction must be minimize or maximize")
    for label, name, known in (("sampler", f.sampler.name, SAMPLERS), ("pruner", f.pruner.name, PRUNERS)):
        if name not in known:
            raise ConfigError(
                f"{sweep.path}: unknown {label} {name!r}; one of {', '.join(known)}.{_suggest(name, known)}"
            )
    if f.n_trials < 0:
        raise ConfigError(f"{sweep.path}: n_trials must be >= 0, got {f.n_trials}")
    hb = f.heartbeat
    if hb.interval_s < 1 or hb.grace_period_s <= hb.interval_s or hb.retries < 0:
        raise ConfigError(
            f"{sweep.path}: heartbeat needs interval_s >= 1, grace_period_s > interval_s and retries >= 0, got "
            f"{hb.interval_s}, {hb.grace_period_s}, {hb.retries}"
        )
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


# ------------------------------------------------------------------------------------------------ storage


def open_storage(url: str, heartbeat: HeartbeatSpec | None = None):
    """Optuna's RDB storage for ``url`` (schema created on first use). sqlite waits for locks instead of failing when
    several workers write at once; the heartbeat lets any later worker fail, and queue again, the trials of a killed
    one (``HeartbeatSpec``). ``postgresql://`` URLs reach PostgreSQL through psycopg 3 (SQLAlchemy >= 2.1's default
    driver; both come with the ``sweep`` extra)."""
    import optuna

    hb = heartbeat or HeartbeatSpec()
    kwargs: dict[str, Any] = {"heartbeat_interval": hb.interval_s, "grace_period": hb.grace_period_s}
    if url.startswith("sqlite:"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks the heartbeat and the retry callback experimental
            retry = optuna.storages.RetryFailedTrialCallback(max_retry=hb.retries)
            return optuna.storages.RDBStorage(url, failed_trial_callback=retry, **kwargs)
    except Exception as exc:  # sqlalchemy errors, a missing driver, a bad URL
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(mask(f"cannot open the Optuna storage {url!r}: {reason}")) from None


def _log_masked_copy(client, run_id: str, path: Path) -> None:
    """Upload the sweep file to the parent run, with any password in its URLs masked."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / Path(path).name
        copy.write_text(mask(Path(path).read_text(encoding="utf-8")), encoding="utf-8")
        client.log_artifact(run_id, str(copy))


# ------------------------------------------------------------------------------------------------- pruning


def pruning_callback(trial, monitor: str):
    """A Lightning callback that reports ``monitor`` to the trial after every validation, by optimizer step, and asks
    the run to stop when the pruner says so (the run then ends normally, with its summary and checkpoint).

    Under DDP only global rank 0 holds the trial (``trial`` is None on the other ranks): it reports and asks the
    pruner, and broadcasts the answer, so every rank stops at the same step or none does."""
    import lightning as L

    class Pruning(L.Callback):
        pruned_at: int | None = None

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking or self.pruned_at is not None:
                return
            prune = False
            if trainer.is_global_zero and trial is not None:
                value = trainer.callback_metrics.get(monitor)
                if value is not None:
                    trial.report(float(value), step=trainer.global_step)
                    finished = trainer.global_step >= trainer.max_steps  # a run that got to the end is not pruned
                    prune = not finished and trial.should_prune()
            if trainer.world_size > 1:
                prune = bool(trainer.strategy.broadcast(prune, src=0))
            if prune:
                self.pruned_at = trainer.global_step
                trainer.should_stop = True

    return Pruning()


# -------------------------------------------------------------------------------------------------- trials


@dataclass
class _Context:
    """What a worker needs to run trials (picklable, sent to spawned workers)."""

    sweep_path: str
    storage_url: str
    parent_run_id: str | None
    tracking_uri: str | None
    progress_bar: bool
    threads: int | None = None
    budget: int | None = None  # the study-wide trial budget shared by every worker on every machine (None: none)


def _objective(ctx: _Context, sweep: Sweep):
    import optuna

    from nlplatform.train.run import train

    def objective(trial) -> float:
        if ctx.budget is not None and _over_budget(trial, ctx.budget):
            # Other workers started the budget's last trials while this one asked for its trial: it does not run.
            trial.set_user_attr(SKIPPED, True)
            trial.study.stop()
            print(f"[{sweep.name}] trial {trial.number} not run: the study's {ctx.budget} trials are taken",
                  file=sys.stderr)  # fmt: skip
            raise optuna.TrialPruned("budget spent")
        if sweep.file.sampler.seed is not None:
            seed_for_trial(trial.study.sampler, sweep.file.sampler.seed, trial.number)
        values = {p.key: p.suggest(trial) for p in sweep.params}
        overrides = sweep.trial_overrides(values, trial.number)
        if not ctx.progress_bar:
            overrides.append("trainer.enable_progress_bar=false")
        command = mask(sweep.command(overrides))  # printed, stored in the study, tagged in MLflow: no password
        trial.set_user_attr("command", command)
        trial.set_user_attr("overrides", [mask(o) for o in overrides])
        print(f"[{sweep.name}] trial {trial.number}: {command}", file=sys.stderr, flush=True)
        try:
            cfg = load_recipe(sweep.file.recipe, overrides)
            monitor = PRUNE_METRICS.get(sweep.file.objective.metric, "val/loss")
            pruning = pruning_callback(trial, monitor)
            tags = {"sweep.role": "trial", "sweep.study": sweep.name, "sweep.trial": str(trial.number)}
            if ctx.parent_run_id:
                tags["mlflow.parentRunId"] = ctx.parent_run_id
            # Ranks that Lightning's launcher starts for a multi-device trial rerun this command: this tells them
            # to train the trial's recipe and follow rank 0's pruning decisions (follow_trial) instead of asking
            # the study for trials of their own.
            with _one_launch():
                os.environ[_TRIAL_ENV] = json.dumps({"recipe": str(sweep.file.recipe), "overrides": overrides,
                                                     "monitor": monitor})  # fmt: skip
                result = train(cfg, callbacks=(pruning,), tags=tags)
        except Exception as exc:
            trial.set_user_attr("error", mask(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            print(f"[{sweep.name}] trial {trial.number} failed: {trial.user_attrs['error']}", file=sys.stderr)
            raise
        trial.set_user_attr("run_dir", str(result.run_dir))
        trial.set_user_attr("mlflow_run_id", result.summary.get("mlflow_run_id"))
        value = result.summary[sweep.file.objective.metric]
        if pruning.pruned_at is not None:
            _tag_run(ctx, result.summary.get("mlflow_run_id"), {"sweep.state": "pruned"})
            print(f"[{sweep.name}] trial {trial.number} pruned at step {pruning.pruned_at}", file=sys.stderr)
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        _tag_run(ctx, result.summary.get("mlflow_run_id"), {"sweep.state": "complete"})
        if value is None or not math.isfinite(value):
            raise ValueError(f"objective {sweep.file.objective.metric} is {value}")
        return float(value)

    return objective


def _tag_run(ctx: _Context, run_id: str | None, tags: dict[str, str]) -> None:
    if not run_id:
        return
    from nlplatform.tracking import client as mlflow_client

    def tag() -> None:
        client = mlflow_client(ctx.tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)

    _not_fatal(f"the tags of run {run_id}", tag)


def _not_fatal(what: str, call) -> None:
    """Make an MLflow call whose failure (a tracking server gone) costs a warning, never a finished trial or study:
    the study in the Optuna storage and the runs' folders hold everything."""
    try:
        call()
    except Exception as exc:
        print(mask(f"warning: {what} not logged to MLflow: {one_line(exc)}"), file=sys.stderr)


def _worker(ctx: _Context, n_trials: int) -> None:
    """Run up to ``n_trials`` trials of the study in this process (a spawned worker, or the calling process). With
    ``ctx.budget`` set, stop once the study holds that many trials, finished or running, whoever ran them: machines
    sharing one storage then share the sweep file's budget instead of each running it."""
    import optuna
    from optuna.trial import TrialState

    if ctx.threads:
        import torch

        torch.set_num_threads(ctx.threads)
    sweep = load_sweep(ctx.sweep_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=sweep.name,
        storage=open_storage(ctx.storage_url, sweep.file.heartbeat),
        sampler=build_sampler(sweep.file.sampler),
        pruner=build_pruner(sweep.file.pruner),
    )
    optuna.storages.fail_stale_trials(study)  # trials of a killed worker: failed, and queued again (heartbeat)
    callbacks = []
    if ctx.budget is not None:
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(_spending(trials, running=True)) >= ctx.budget:
            return

        def stop_when_spent(study, _trial) -> None:
            if len(_spending(study.get_trials(deepcopy=False), running=True)) >= ctx.budget:
                study.stop()

        callbacks.append(stop_when_spent)
    study.optimize(
        _objective(ctx, sweep), n_trials=n_trials, catch=(Exception,), gc_after_trial=True, callbacks=callbacks
    )


# --------------------------------------------------------------------------------------------------- driver


@dataclass
class SweepResult:
    study_name: str
    storage: str
    n_trials: int  # trials in the study after this call
    best: dict[str, Any] | None  # number, value, params, command of the best complete trial
    importances: dict[str, float]
    parent_run_id: str | None
    plots: list[Path]


SKIPPED = "skipped"  # user attribute of a trial asked for after other workers had taken the budget: it never ran


def _spending(trials, *, running: bool) -> list:
    """The trials that spend the study's budget: finished ones (failures too, except those queued again after their
    worker died: the retry spends in their place), with ``running`` also those running now. Trials
    that never ran (SKIPPED) spend nothing."""
    from optuna.trial import TrialState

    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    states = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}
    if running:
        states |= {TrialState.RUNNING}
    return [t for t in trials if t.state in states and t.number not in retried and SKIPPED not in t.user_attrs]


def _over_budget(trial, budget: int) -> bool:
    """Whether ``budget`` trials numbered below this one already spend the budget. Trial numbers come from the
    storage in one sequence, so of the workers that start trials at the same moment, on any machine, exactly those
    within the budget run: no check-then-ask race can make the study overshoot."""
    from optuna.trial import TrialState

    trials = trial.study.get_trials(deepcopy=False)  # all of them: a later retry frees its failed trial's place
    spent = [t for t in _spending(trials, running=True) if t.number < trial.number]
    queued = [t for t in trials if t.number < trial.number and t.state == TrialState.WAITING]  # they run first
    return len(spent) + len(queued) >= budget


def _finished(study) -> int:
    return len(_spending(study.get_trials(deepcopy=False), running=False))


_TRIAL_ENV = "NLPLATFORM_SWEEP_TRIAL"
# What Lightning's launcher sets in the process that starts a multi-device run's ranks, and what the run hands them.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "NLPLATFORM_RUN", _TRIAL_ENV)


@contextlib.contextmanager
def _one_launch():
    """One trial's training, after which this process is as before it: Lightning's launcher leaves its ranks'
    environment and the process group behind, and the next multi-device trial would take them for a launch already
    made (its Trainer then waits for ranks that have exited)."""
    saved = {key: os.environ.get(key) for key in _LAUNCH_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def follow_trial() -> bool:
    """In a process that Lightning's launcher started for rank > 0 of a multi-device trial: train that trial's recipe,
    following rank 0's pruning decisions, and return True (the command is done). False anywhere else. A sweep
    command started on several ranks by torchrun or srun is refused: each rank would ask the study for trials."""
    spec = os.environ.get(_TRIAL_ENV)
    if spec is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "start a sweep as one process per machine (not under torchrun or srun): a trial trains on several "
                "devices with trainer.devices=N in its overrides, and Lightning starts those ranks itself"
            )
        return False
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        return False
    from nlplatform.train.run import train

    trial = json.loads(spec)
    train(load_recipe(trial["recipe"], trial["overrides"]), callbacks=(pruning_callback(None, trial["monitor"]),))
    return True


def _parent_run(sweep: Sweep, study, tracking_uri: str) -> str:
    """The study's MLflow parent run: created on the first call (the run id is kept in the study), reopened after."""
    from nlplatform.tracking import client as mlflow_client
    from nlplatform.tracking import experiment_id

    client = mlflow_client(tracking_uri)
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id
        except Exception:  # deleted, or another tracking store: start a new parent run
            pass
    exp_id = experiment_id(client, sweep.experiment)
    tags = {"sweep.role": "study", "sweep.study": sweep.name, "sweep.recipe": str(sweep.file.recipe)}
    run = client.create_run(exp_id, run_name=f"{sweep.name}-study", tags=tags)
    study.set_user_attr("mlflow_parent_run_id", run.info.run_id)
    return run.info.run_id


def run_sweep(
    path: str | Path, *, n_trials: int | None = None, storage: str | None = None, workers: int = 1
) -> SweepResult:
    """Create or continue the study of a sweep file and run its missing trials (or ``n_trials`` more) on
    ``workers`` processes of this machine; then summarise, plot, and log the plots to the parent MLflow run."""
    import optuna

    from nlplatform import tracking as trk

    sweep = load_sweep(path)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if n_trials is not None and n_trials < 0:
        raise ConfigError(f"--n-trials must be >= 0, got {n_trials}")
    url = storage or sweep.file.storage or DEFAULT_STORAGE
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Stores are created here, once, before any worker starts, so workers never race on schema creation.
    study = optuna.create_study(
        study_name=sweep.name,
        storage=open_storage(url, sweep.file.heartbeat),
        sampler=build_sampler(sweep.file.sampler),
        pruner=build_pruner(sweep.file.pruner),
        direction=sweep.file.objective.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != sweep.file.objective.direction:
        raise ConfigError(
            f"study {sweep.name!r} in {mask(url)} was created to {study.direction.name.lower()} its objective; this "
            f"sweep file says {sweep.file.objective.direction} (rename the sweep or use another storage)"
        )
    done = _finished(study)
    todo = n_trials if n_trials is not None else max(0, sweep.file.n_trials - done)
    if done == 0 and not study.user_attrs.get("enqueued"):
        for values in sweep.file.enqueue:
            study.enqueue_trial(values, skip_if_exists=True)
        study.set_user_attr("enqueued", True)

    base = load_recipe(sweep.file.recipe, sweep.file.overrides)  # where the trials' runs are tracked, if at all
    uri = trk.absolute_uri(trk.tracking_uri(base)) if base.tracking.enabled else None
    parent = None
    if uri:
        from nlplatform.tracking import client as mlflow_client

        try:
            parent = _parent_run(sweep, study, uri)
            _log_masked_copy(mlflow_client(uri), parent, sweep.path)
        except Exception as exc:  # before any trial: a store that cannot be reached is bad input
            raise trk.unreachable(uri, exc, "or set tracking.enabled=false in the sweep's overrides") from None
    print(
        f"study {sweep.name!r} in {mask(url)}: {done} trial(s) so far, running up to {todo} more on {workers} worker(s)"
        + (f"; MLflow experiment {sweep.experiment!r}, parent run {parent}" if parent else ""),
        file=sys.stderr,
    )
    if todo:
        budget = None if n_trials is not None else sweep.file.n_trials
        ctx = _Context(str(sweep.path), url, parent, uri, progress_bar=workers == 1, budget=budget)
        if workers == 1:
            _worker(ctx, todo)
        else:
            _run_workers(ctx, todo, workers)
    return _summarise(sweep, url, uri, parent, Path(base.output_dir) / sweep.experiment / f"{sweep.name}-plots")


def _run_workers(ctx: _Context, todo: int, workers: int) -> None:
    """K spawned processes, each running its share of the trials against the shared storage; the CPU's threads are
    split between them."""
    workers = min(workers, todo)
    ctx.threads = max(1, (os.cpu_count() or 1) // workers)
    shares = [todo // workers + (i < todo % workers) for i in range(workers)]
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_worker, args=(ctx, n), name=f"sweep-worker-{i}") for i, n in enumerate(shares)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.name for p in procs if p.exitcode != 0]
    if bad:
        print(f"warning: worker(s) {', '.join(bad)} exited abnormally; see the trials' states", file=sys.stderr)


def _summarise(sweep: Sweep, url: str, tracking_uri: str | None, parent: str | None, plots_dir: Path) -> SweepResult:
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=sweep.name, storage=open_storage(url, sweep.file.heartbeat))
    trials = [t for t in study.get_trials(deepcopy=False) if SKIPPED not in t.user_attrs]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    print(f"\nstudy {sweep.name}: {len(trials)} trials ({', '.join(f'{n} {k}' for k, n in counts.items() if n)})")
    retried_as = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", ())[-1:]}
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else "-"
        notes = [t.user_attrs.get("error", "") if t.state == TrialState.FAIL else ""]
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            notes.append("worker lost (no heartbeat)")
        if t.number in retried_as:
            notes.append(f"retried as #{retried_as[t.number]}")
        if "failed_trial" in t.system_attrs:
            notes.append(f"retry of #{t.system_attrs['retry_history'][-1]}")
        extra = "; ".join(n for n in notes if n)
        print(
            f"  #{t.number:<4} {t.state.name.lower():<9} {sweep.file.objective.metric}={value:<10} {t.params} {extra}"
        )
    best = None
    if complete:
        bt = study.best_trial
        best = {"number": bt.number, "value": bt.value, "params": bt.params, "command": bt.user_attrs.get("command")}
        print(f"best: trial {bt.number}, {sweep.file.objective.metric} = {bt.value:.4f}")
        print(f"  reproduce: {best['command']}")
    importances = _importances(study)
    if importances:
        print("parameter importance (fANOVA):")
        for key, value in importances.items():
            print(f"  {key:<40} {value:.3f}")
    plots = _plots(study, plots_dir)
    if parent and tracking_uri:
        _not_fatal(f"the study's summary (parent run {parent})",
                   lambda: _log_summary(tracking_uri, parent, sweep, plots, trials, complete, counts, best))  # fmt: skip
    if tracking_uri and complete:  # the experiment's page in the MLflow UI opens on its ranking, trials included
        _not_fatal(f"the leaderboard of experiment {sweep.experiment!r}", lambda: _publish(sweep, tracking_uri))
    return SweepResult(sweep.name, mask(url), len(trials), best, importances, parent, plots)


def _publish(sweep: Sweep, tracking_uri: str) -> None:
    """The sweep experiment's leaderboard into its description, and its page's address on stderr."""
    from nlplatform.leaderboard import announce, publish_experiments

    announce(publish_experiments([sweep.experiment], tracking_uri), tracking_uri)


def _log_summary(tracking_uri, parent, sweep, plots, trials, complete, counts, best) -> None:
    """The study's figures, plots and best trial on its MLflow parent run, which then ends."""
    from nlplatform.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    for plot in plots:
        client.log_artifact(parent, str(plot), artifact_path="plots")
    client.log_metric(parent, "sweep/trials", len(trials))
    client.log_metric(parent, "sweep/complete", len(complete))
    client.log_metric(parent, "sweep/pruned", counts.get("pruned", 0))
    client.log_metric(parent, "sweep/failed", counts.get("fail", 0))
    if best is not None:
        client.log_metric(parent, f"sweep/best_{sweep.file.objective.metric}", best["value"])
        client.set_tag(parent, "sweep.best_trial", str(best["number"]))
        client.set_tag(parent, "sweep.best_command", best["command"] or "")
    client.set_terminated(parent, status="FINISHED")


def _importances(study) -> dict[str, float]:
    """fANOVA importances of the searched parameters; empty until two complete trials differ in some parameter."""
    import optuna
    from optuna.trial import TrialState

    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # a single distinct value everywhere, or a dynamic space
        return {}


def _plots(study, folder: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as PNGs (matplotlib); a plot
    that the study cannot support yet (too few trials) is left out."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    os.environ.setdefault("MPLCONFIGDIR", str(Path(".cache/matplotlib").resolve()))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, plot in (
        ("history", ovm.plot_optimization_history),
        ("importance", ovm.plot_param_importances),
        ("parallel_coordinate", ovm.plot_parallel_coordinate),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
        except (RuntimeError, ValueError, ZeroDivisionError):
            continue
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out
