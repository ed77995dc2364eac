"""MLflow wiring: where runs go, the Lightning logger, tags and artifacts.

The default store is a serverless sqlite database in the working directory (``sqlite:///mlruns.db``; MLflow's plain
file store is deprecated). ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` override it; ``make ui`` serves it.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path
from typing import Any

from nlplatform.config import RecipeConfig, flatten, recipe_to_dict
from nlplatform.secrets import mask

DEFAULT_URI = "sqlite:///mlruns.db"

# import mlflow writes telemetry into ~/.config unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(cfg: RecipeConfig | None = None) -> str:
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def absolute_uri(uri: str) -> str:
    """The URI with a relative sqlite path made absolute (against the working directory), so that commands run later
    from another directory (``nlplatform eval``) reach the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


_READY: set[str] = set()  # stores this process has opened


def ensure_store(uri: str) -> None:
    """Create a fresh sqlite store's tables once, under a file lock beside it. MLflow migrates a new database's schema
    on first use, and processes doing that at once collide ("duplicate column name: step", "table _alembic_tmp_metrics
    already exists"): sweep workers, the ranks of several runs, or runs started together. Other stores (a tracking
    server, PostgreSQL) serialise their own migrations."""
    if uri in _READY or not uri.startswith("sqlite:///"):
        return
    from mlflow.tracking import MlflowClient

    from nlplatform.files import exclusive_lock

    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path.with_name(f".{path.name}.lock")):
        MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the schema when it is new
    _READY.add(uri)


def client(uri: str):
    """An ``MlflowClient`` of ``uri``, its store created first when it is a fresh sqlite file (``ensure_store``)."""
    from mlflow.tracking import MlflowClient

    ensure_store(uri)
    return MlflowClient(uri)


def git_commit() -> str:
    """The commit of the code that ran (with '-dirty' when the work tree has changes), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_logger(cfg: RecipeConfig, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None):
    """Lightning's MLFlowLogger for this run (continuing ``run_id`` on resume), or None when tracking is off. ``tags``
    join the default ones on a new run."""
    if not cfg.tracking.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    ensure_store(tracking_uri(cfg))
    tags = {
        "family": cfg.model.name,
        "preset": cfg.model.preset,
        "git_commit": git_commit(),
        **(tags or {}),
    }
    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=run_name,
        tracking_uri=tracking_uri(cfg),
        tags=tags if run_id is None else None,
        run_id=run_id,
        log_model=False,
    )


def recipe_params(cfg: RecipeConfig) -> dict[str, Any]:
    """The flattened recipe as MLflow params (lists as strings, None as 'null')."""
    out = {}
    for key, value in flatten(recipe_to_dict(cfg)).items():
        value = "null" if value is None else (str(value) if isinstance(value, (list, tuple)) else value)
        out[key] = mask(value) if isinstance(value, str) else value
    return out


SUMMARY_METRICS = ("params", "tokens_seen", "steps", "train_loss", "val_loss", "val_ppl", "tokens_per_sec", "wall_s")


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A run's closing figures as ``summary/<key>`` MLflow metrics (what the leaderboard reads); missing or
    non-finite values are left out."""
    out = {}
    for key in SUMMARY_METRICS:
        value = summary.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"summary/{key}"] = float(value)
    return out


def log_artifacts(logger, paths: list[Path]) -> None:
    if logger is None:
        return
    for path in paths:
        if path.exists():
            logger.experiment.log_artifact(logger.run_id, str(path))
