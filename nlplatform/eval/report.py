"""What every eval suite reports the same way: the results JSON beside the checkpoint, the checkpoint's MLflow run,
the figures, and the command's output.

- ``publish``: ``eval-<suite>-<checkpoint stem>.json`` beside the checkpoint, written atomically (which checkpoint,
  step, model, preset and suite, then the suite's own fields and its metrics), and the metrics, the JSON and the
  plots logged into the MLflow run that trained the checkpoint (its ``run.json`` names it);
- ``heatmap`` and ``save_figure``: the matrix plots of the suites (a value in every cell) and their PNGs;
- ``announce``: the command's summary on stdout, where the metrics went on stderr, the results JSON last.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlplatform.data import atomic_write_text
from nlplatform.data.fetch import one_line
from nlplatform.secrets import MASK, mask


@dataclass
class SuiteResult:
    path: Path  # the results JSON beside the checkpoint
    metrics: dict[str, float]  # eval/...
    plots: list[Path] = field(default_factory=list)  # PNGs beside the checkpoint
    mlflow_run_id: str | None = None  # None: not logged (not tracked, or the run is out of reach)


def results_stem(checkpoint: Path, suite: str) -> Path:
    """``<checkpoint folder>/eval-<suite>-<checkpoint stem>``: the results JSON adds ``.json``, a plot ``-<name>.png``."""
    return checkpoint.parent / f"eval-{suite}-{checkpoint.stem}"


def plot_title(loaded) -> str:
    """``<family> (<preset>), step <n>``: what the suites' figures say they show."""
    return f"{loaded.recipe.model.name} ({loaded.recipe.model.preset}), step {loaded.step}"


def publish(
    checkpoint: Path,
    loaded,
    suite: str,
    fields: dict[str, Any],
    metrics: dict[str, float],
    plots: list[Path] | None = None,
    *,
    track: bool = True,
) -> SuiteResult:
    """Write the results JSON of ``suite`` beside ``checkpoint`` (atomically: a reader never sees half of it) and,
    with ``track``, log ``metrics`` at the checkpoint's step and the JSON and ``plots`` under ``eval/`` into the
    checkpoint's MLflow run."""
    plots = list(plots or [])
    stem = results_stem(checkpoint, suite)
    path = stem.with_name(f"{stem.name}.json")
    document = {
        "checkpoint": str(checkpoint.resolve()),
        "step": loaded.step,
        "model": loaded.recipe.model.name,
        "preset": loaded.recipe.model.preset,
        "suite": suite,
        **fields,
        "metrics": metrics,
    }
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")
    run_id = log_eval_to_mlflow(checkpoint, metrics, loaded.step, [path, *plots]) if track else None
    return SuiteResult(path=path, metrics=metrics, plots=plots, mlflow_run_id=run_id)


def announce(result: SuiteResult, summary: str, logged_as: str) -> None:
    """The command's output: ``summary`` (a markdown table), where the metrics (``logged_as``) and the plots went,
    and the results JSON as the last line of stdout (the contract scripts read)."""
    print(summary)
    where = f"MLflow run {result.mlflow_run_id}" if result.mlflow_run_id else "not tracked (no MLflow run)"
    plots = f"; plots: {', '.join(p.name for p in result.plots)}" if result.plots else ""
    print(f"metrics logged as {logged_as}: {where}{plots}", file=sys.stderr)
    print(result.path.resolve())


# ----------------------------------------------------------------------------------------------------- MLflow


def run_store(saved: str | None, current: str) -> str | None:
    """The tracking URI to log into a run whose ``run.json`` recorded ``saved`` (None: not recorded), given the
    ``current`` one (recipe-free: ``MLFLOW_TRACKING_URI`` or the default). ``run.json`` keeps URLs with their password
    masked, so such a store is reached through ``current`` when it is the same URL with the password; None when it
    is not."""
    if not saved:
        return current
    if f":{MASK}@" not in saved:  # no password was masked: the recorded URI works as it is
        return saved
    return current if mask(current) == saved else None


def log_eval_to_mlflow(
    checkpoint: Path, metrics: dict[str, float], step: int, artifact: Path | list[Path]
) -> str | None:
    """Log into the checkpoint's own MLflow run (from its run.json), the artifacts under ``eval/``; None when the run
    was not tracked."""
    run_json = checkpoint.resolve().parent.parent / "run.json"
    meta = json.loads(run_json.read_text()) if run_json.is_file() else {}
    run_id = meta.get("mlflow_run_id")
    if not run_id:
        return None
    from mlflow.entities import Metric

    from nlplatform.tracking import client as mlflow_client
    from nlplatform.tracking import tracking_uri

    uri = run_store(meta.get("tracking_uri"), tracking_uri())
    if uri is None:
        print(
            f"warning: not logged to MLflow run {run_id}: its store {meta['tracking_uri']} needs a password run.json "
            "does not keep; export MLFLOW_TRACKING_URI with it (or keep it in PGPASSWORD / MLFLOW_TRACKING_PASSWORD)",
            file=sys.stderr,
        )
        return None
    stamp = int(time.time() * 1000)
    try:
        client = mlflow_client(uri)
        client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])
        for path in artifact if isinstance(artifact, list) else [artifact]:
            client.log_artifact(run_id, str(path), artifact_path="eval")
    except Exception as exc:  # the store moved or is unreachable: the results JSON is written either way
        print(mask(f"warning: could not log to MLflow run {run_id} in {uri}: {one_line(exc)}"), file=sys.stderr)
        return None
    return run_id


# ----------------------------------------------------------------------------------------------------- figures


def heatmap(fig, ax, grid: list[list[float]], cell: str, *, cmap: str, norm=None, **imshow: Any) -> None:
    """``grid`` as an image on ``ax`` with its colour bar, each cell's value written in it (``cell``: a format such
    as ``"{:.2f}"``); NaN cells (nothing measured) are left blank."""
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", **imshow)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, cell.format(value), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)


def save_figure(fig, path: Path) -> Path:
    """Lay out ``fig``, write it to ``path`` (PNG) and free it; returns ``path``."""
    from nlplatform.plots import pyplot

    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path
