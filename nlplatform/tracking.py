"""MLflow wiring: where runs go, the Lightning logger, tags and artifacts.

The default store is a serverless sqlite database in the working directory (``sqlite:///mlruns.db``; MLflow's plain
file store is deprecated). ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` override it; ``make ui`` serves it.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from nlplatform.config import RecipeConfig
from nlplatform.errors import UserError, one_line
from nlplatform.recipe import flatten, recipe_to_dict
from nlplatform.secrets import mask

DEFAULT_URI = "sqlite:///mlruns.db"

# import mlflow writes telemetry into ~/.config unless told not to.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow prints "View run ... at: <tracking URI>" on stdout when a run on a server ends: the URI as given, password
# included, and lines after the command's contract (the last stdout line). The run's id is in run.json instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's HTTP defaults (7 retries with doubling back-off, 120 s timeouts) stall a call to a lost tracking server for
# minutes; bounded here (a call gives up within about 40 s against a server that hangs, a few seconds against one
# that is gone), for this process and the ranks and workers it starts. An explicit setting wins.
for _key, _value in (
    ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"),
    ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
    ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
):
    os.environ.setdefault(_key, _value)


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


# MLflow's kind of experiment: every experiment the platform creates is marked as model training (runs, metrics,
# charts), not GenAI (traces, judges, prompts). MLflow 3.17's UI picks its layout from the browser's last choice (the
# switch at the top left, GenAI at first) or the address's ``workflowType``, and reads this tag where that switch is
# turned off.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(mlflow_client, name: str) -> str:
    """The id of experiment ``name``, created (marked as model training) when it does not exist yet. Two processes
    creating it at once both get the one that exists."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    except MlflowException:  # created by another process in between
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def ui_link(uri: str, experiment: str) -> str | None:
    """The address of an experiment's runs page in the MLflow UI serving ``uri`` (http stores only): in the
    model-training layout and sorted by the leaderboard's metric. None for stores that are not a server (the UI of a
    sqlite file is ``make ui``)."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{mask(uri).rstrip('/')}/#/experiments/{experiment}/runs?{UI_QUERY}"


# The runs page's query: the model-training layout (MLflow 3's UI otherwise opens pages in the layout the browser last
# chose, GenAI at first, whatever the experiment's kind), best validation perplexity first (the leaderboard's order)
UI_QUERY = "workflowType=machine_learning&orderByKey=metrics.%60summary%2Fval_ppl%60&orderByAsc=true"


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


class Outbox:
    """The MLflow calls of one run, made in order on a background thread, so that a slow or lost tracking server never
    stalls or stops training. Each call is made once (MLflow's HTTP layer retries it a few times, bounded above); a
    failure is counted, never raised, and ``problem`` reports it when the run ends. Metric batches queued together
    go out as one request. At most ``capacity`` calls wait; beyond that new ones are dropped, and counted."""

    def __init__(self, client, capacity: int = 10_000) -> None:
        import collections
        import threading

        self._client = client
        self._capacity = capacity
        self._calls: collections.deque = collections.deque()
        self._ready = threading.Condition()
        self._busy = False
        self._thread: threading.Thread | None = None
        self.failed = self.dropped = self.lost = 0
        self.first_error: str | None = None
        self.down = False  # the last call failed: the store is not answering now

    def call(self, method: str, *args, **kwargs) -> None:
        """Queue ``client.<method>(*args, **kwargs)``."""
        self._put((method, args, kwargs))

    def metrics(self, run_id: str, metrics: list) -> None:
        self._put(("metrics", run_id, metrics))

    def _put(self, item) -> None:
        import threading

        with self._ready:
            if len(self._calls) >= self._capacity:
                self.dropped += 1
                return
            self._calls.append(item)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
                self._thread.start()
            self._ready.notify()

    def _next(self):
        """The next call; consecutive metric batches of one run merged (MLflow takes 1000 metrics a request)."""
        with self._ready:
            while not self._calls:
                self._ready.wait()
            item = self._calls.popleft()
            if item[0] == "metrics":
                merged = list(item[2])
                while self._calls and self._calls[0][:2] == item[:2] and len(merged) + len(self._calls[0][2]) <= 1000:
                    merged += self._calls.popleft()[2]
                item = ("log_batch", (item[1],), {"metrics": merged})
            self._busy = True
            return item

    def _run(self) -> None:
        while True:
            method, args, kwargs = self._next()
            try:
                getattr(self._client, method)(*args, **kwargs)
                self.down = False
            except Exception as exc:  # a lost server, a timeout, a refused request: never the run's end
                self.failed += 1
                self.down = True
                if self.first_error is None:
                    reason = str(exc).splitlines()[0] if str(exc) else ""
                    text = f"{method}: {type(exc).__name__}: {reason}"
                    self.first_error = mask(text if len(text) <= 240 else text[:240] + "...")
            finally:
                with self._ready:
                    self._busy = False
                    self._ready.notify_all()

    def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` (none once the store has stopped answering) for the queued calls to be made; those
        still waiting then are counted as lost (they may still go out while the process lives)."""
        import time

        deadline = time.monotonic() + (0.0 if self.down else timeout_s)
        with self._ready:
            while (self._calls or self._busy) and not self.down:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(min(left, 0.5))
            self.lost = len(self._calls)

    def problem(self, uri: str) -> str | None:
        """One line saying what did not reach the store, or None when everything did."""
        if not (self.failed or self.dropped or self.lost):
            return None
        parts = [
            f"{n} {what}"
            for n, what in (
                (self.failed, "failed"),
                (self.dropped, "dropped (queue full)"),
                (self.lost, "not sent before the run ended"),
            )
            if n
        ]
        first = f" (first failure: {self.first_error})" if self.first_error else ""
        return f"MLflow calls to {mask(uri)}: {', '.join(parts)}{first}; the run folder holds the whole run"


def make_logger(cfg: RecipeConfig, run_name: str, run_id: str | None = None, tags: dict[str, str] | None = None):
    """The run's MLflow logger (continuing ``run_id`` on resume), or None when tracking is off. ``tags`` join the
    default ones on a new run. The MLflow run is created (or found) here, on global rank 0, synchronously: a store
    that cannot be reached is bad input (exit 2) before anything is written. After that every call goes through the
    logger's ``Outbox``: nothing the store does can stall or stop training."""
    if not cfg.tracking.enabled:
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri(cfg)

    class TrackingLogger(MLFlowLogger):
        """Lightning's MLflow logger whose calls after the run's creation are queued on an ``Outbox``."""

        outbox: Outbox | None = None

        @property
        def experiment(self):
            client = super().experiment  # creates the experiment and run on first use (rank 0; gives the run id)
            if self.outbox is None:
                self.outbox = Outbox(client)
            return _Queued(client, self.outbox)

        def log_metrics(self, metrics, step=None) -> None:
            from lightning.pytorch.utilities import rank_zero_only
            from mlflow.entities import Metric

            if rank_zero_only.rank != 0:
                return
            now = int(time.time() * 1000)  # stamped when logged, not when sent
            batch = [
                Metric(key=k, value=float(v), timestamp=now, step=step or 0)
                for k, v in metrics.items()
                if not isinstance(v, str)
            ]
            self.experiment  # noqa: B018 - the run and the outbox exist first
            self.outbox.metrics(self.run_id, batch)

        def finalize(self, status: str = "success") -> None:
            from lightning.pytorch.utilities import rank_zero_only

            if rank_zero_only.rank != 0 or not self._initialized:
                return
            status = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}.get(status, status.upper())
            self.experiment.set_terminated(self.run_id, status)
            self.outbox.drain(cfg.tracking.flush_timeout_s)

        def problem(self) -> str | None:
            return self.outbox.problem(uri) if self.outbox is not None else None

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank == 0:
        try:  # created here, marked as model training (Lightning's logger would create it unmarked)
            experiment_id(client(uri), cfg.tracking.experiment)
        except Exception as exc:
            raise unreachable(uri, exc, "point MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false") from None
    tags = {
        "family": cfg.model.name,
        "preset": cfg.model.preset,
        "git_commit": git_commit(),
        **(tags or {}),
    }
    logger = TrackingLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=run_name,
        tracking_uri=uri,
        tags=tags if run_id is None else None,
        run_id=run_id,
        log_model=False,
    )
    try:
        _ = logger.run_id  # rank 0 creates or finds the run now
    except Exception as exc:
        raise unreachable(uri, exc, "point MLFLOW_TRACKING_URI elsewhere, or set tracking.enabled=false") from None
    return logger


def unreachable(uri: str, exc: Exception, remedy: str) -> UserError:
    """Bad input (exit 2) for a store that does not answer when a command starts, password masked."""
    return UserError(
        mask(f"cannot reach the MLflow store {uri}: {one_line(exc)}; start it (make tracking-server), {remedy}")
    )


class _Queued:
    """An ``MlflowClient`` whose writes go to an ``Outbox`` (returning None at once) and whose reads are made now."""

    WRITES = ("log_batch", "log_metric", "log_param", "set_tag", "set_terminated", "log_artifact", "log_artifacts")

    def __init__(self, client, outbox: Outbox) -> None:
        self._client, self._outbox = client, outbox

    def __getattr__(self, name: str):
        if name in self.WRITES:
            return lambda *args, **kwargs: self._outbox.call(name, *args, **kwargs)
        return getattr(self._client, name)


def recipe_params(cfg: RecipeConfig) -> dict[str, Any]:
    """The flattened recipe as MLflow params (lists as strings, None as 'null')."""
    out = {}
    for key, value in flatten(recipe_to_dict(cfg, masked=True)).items():
        out[key] = "null" if value is None else (str(value) if isinstance(value, (list, tuple)) else value)
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
