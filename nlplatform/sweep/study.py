"""The study driver: Optuna's storage, the trials (each a training run with a pruning callback), the workers that
run them on one machine or many, and the study-wide trial budget they share."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlplatform.errors import ConfigError, UserError
from nlplatform.recipe import load_recipe
from nlplatform.secrets import mask
from nlplatform.sweep.report import SKIPPED, SweepResult, log_masked_copy, not_fatal, summarise
from nlplatform.sweep.spec import (
    PRUNE_METRICS,
    HeartbeatSpec,
    Sweep,
    build_pruner,
    build_sampler,
    load_sweep,
    seed_for_trial,
)

DEFAULT_STORAGE = "sqlite:///sweeps.db"


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

    from nlplatform.train.callbacks import TrialPruning
    from nlplatform.train.run import train

    def objective(trial) -> float:
        if ctx.budget is not None and _over_budget(trial, ctx.budget):
            # Other workers started the budget's last trials while this one asked for its trial: it does not run.
            trial.set_user_attr(SKIPPED, True)
            trial.study.stop()
            print(
                f"[{sweep.name}] trial {trial.number} not run: the study's {ctx.budget} trials are taken",
                file=sys.stderr,
            )
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
            pruning = TrialPruning(trial, monitor)
            tags = {"sweep.role": "trial", "sweep.study": sweep.name, "sweep.trial": str(trial.number)}
            if ctx.parent_run_id:
                tags["mlflow.parentRunId"] = ctx.parent_run_id
            # Ranks that Lightning's launcher starts for a multi-device trial rerun this command: this tells them
            # to train the trial's recipe and follow rank 0's pruning decisions (follow_trial) instead of asking
            # the study for trials of their own.
            with _one_launch():
                os.environ[_TRIAL_ENV] = json.dumps(
                    {"recipe": str(sweep.file.recipe), "overrides": overrides, "monitor": monitor}
                )
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

    not_fatal(f"the tags of run {run_id}", tag)


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
    from nlplatform.train.callbacks import TrialPruning
    from nlplatform.train.run import train

    trial = json.loads(spec)
    train(load_recipe(trial["recipe"], trial["overrides"]), callbacks=(TrialPruning(None, trial["monitor"]),))
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
            log_masked_copy(mlflow_client(uri), parent, sweep.path)
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
    study = optuna.load_study(study_name=sweep.name, storage=open_storage(url, sweep.file.heartbeat))
    plots_dir = Path(base.output_dir) / sweep.experiment / f"{sweep.name}-plots"
    return summarise(sweep, study, mask(url), uri, parent, plots_dir)


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
