"""The study's report: the trials' table and the best trial's command on the terminal, Optuna's plots, the figures
on the MLflow parent run, and the experiment's leaderboard. MLflow is a mirror here: a tracking server that fails
costs a warning (``not_fatal``), never a trial or the study, which live in the Optuna storage."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlplatform.errors import one_line
from nlplatform.plots import pyplot
from nlplatform.secrets import mask
from nlplatform.sweep.spec import Sweep

SKIPPED = "skipped"  # user attribute of a trial asked for after other workers had taken the budget: it never ran


@dataclass
class SweepResult:
    study_name: str
    storage: str
    n_trials: int  # trials in the study after this call
    best: dict[str, Any] | None  # number, value, params, command of the best complete trial
    importances: dict[str, float]
    parent_run_id: str | None
    plots: list[Path]


def not_fatal(what: str, call) -> None:
    """Make an MLflow call whose failure (a tracking server gone) costs a warning, never a finished trial or study:
    the study in the Optuna storage and the runs' folders hold everything."""
    try:
        call()
    except Exception as exc:
        print(mask(f"warning: {what} not logged to MLflow: {one_line(exc)}"), file=sys.stderr)


def log_masked_copy(client, run_id: str, path: Path) -> None:
    """Upload the sweep file to the parent run, with any password in its URLs masked."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / Path(path).name
        copy.write_text(mask(Path(path).read_text(encoding="utf-8")), encoding="utf-8")
        client.log_artifact(run_id, str(copy))


def summarise(
    sweep: Sweep, study, storage: str, tracking_uri: str | None, parent: str | None, plots_dir: Path
) -> SweepResult:
    """Print every trial of ``study``, the best one's command and the parameter importances; plot; log the
    figures on the MLflow parent run and publish the experiment's leaderboard (``storage``: masked, for display)."""
    from optuna.trial import TrialState

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
        summary = lambda: _log_summary(tracking_uri, parent, sweep, plots, trials, complete, counts, best)  # noqa: E731
        not_fatal(f"the study's summary (parent run {parent})", summary)
    if tracking_uri and complete:  # the experiment's page in the MLflow UI opens on its ranking, trials included
        not_fatal(f"the leaderboard of experiment {sweep.experiment!r}", lambda: _publish(sweep, tracking_uri))
    return SweepResult(sweep.name, storage, len(trials), best, importances, parent, plots)


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
    from optuna.visualization import matplotlib as ovm

    plt = pyplot()

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
