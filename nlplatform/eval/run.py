"""``nlplatform eval CHECKPOINT --suite NAME``: lm-eval in process on a checkpoint, results beside it and in MLflow.

The paper-style row (spec §7.2): held-out corpus word perplexity (our stand-in for WikiText), LAMBADA perplexity
and accuracy, PIQA, HellaSwag acc_norm, WinoGrande, ARC-e, ARC-c acc_norm, SIQA, BoolQ, and Avg = the mean of the
eight accuracies.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlplatform.data import atomic_write_text, cache_root
from nlplatform.data.fetch import one_line
from nlplatform.errors import UserError
from nlplatform.eval.tasks import Suite, check_tasks, load_suite, render_tasks, write_heldout_pages
from nlplatform.leaderboard import AVG_METRIC
from nlplatform.secrets import MASK, mask

# (column, task, metric, is an accuracy): the paper's columns in its order.
COLUMNS: list[tuple[str, str, str, bool]] = [
    ("Wiki ppl", "heldout_corpus", "word_perplexity", False),
    ("LMB ppl", "lambada_openai", "perplexity", False),
    ("LMB acc", "lambada_openai", "acc", True),
    ("PIQA", "piqa", "acc", True),
    ("Hella acc_n", "hellaswag", "acc_norm", True),
    ("Wino", "winogrande", "acc", True),
    ("ARC-e", "arc_easy", "acc", True),
    ("ARC-c acc_n", "arc_challenge", "acc_norm", True),
    ("SIQA", "social_iqa", "acc", True),
    ("BoolQ", "boolq", "acc", True),
]


@dataclass
class EvalResult:
    path: Path  # the results JSON beside the checkpoint
    metrics: dict[str, float]  # eval/<task>/<metric>
    row: dict[str, float | None]  # paper column -> value (accuracies in %), plus "Avg"
    mlflow_run_id: str | None


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{task: {"acc,none": 0.5, "acc_stderr,none": ...}}`` as ``{"eval/task/acc": 0.5, ...}``."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = key.split(",")[0]
            out[f"eval/{task}/{name}"] = float(value)
    return out


def paper_row(metrics: dict[str, float]) -> dict[str, float | None]:
    """The paper's columns (accuracies in percent); Avg is the mean of the accuracies present."""
    row: dict[str, float | None] = {}
    accs = []
    for column, task, metric, is_acc in COLUMNS:
        value = metrics.get(f"eval/{task}/{metric}")
        if value is not None and is_acc:
            value *= 100
            accs.append(value)
        row[column] = value
    row["Avg"] = sum(accs) / len(accs) if accs else None
    return row


def format_row(row: dict[str, float | None]) -> str:
    """A two-line markdown table of the row."""
    head = "| " + " | ".join(row) + " |"
    cells = ["-" if v is None else f"{v:.2f}" for v in row.values()]
    return "\n".join([head, "|" + "---|" * len(row), "| " + " | ".join(cells) + " |"])


def _data_files(tasks: list[str], recipe, work: Path, page_chars: int) -> dict[str, Path]:
    """Absolute data paths for the tasks: the offline eval data (fetched on first use) and the held-out pages."""
    from nlplatform.eval.data import DATASETS, dataset_file, require_eval_data

    files: dict[str, Path] = {}
    wanted = {"lambada" if t == "lambada_openai" else t for t in tasks}
    if wanted & set(DATASETS):
        root = require_eval_data()
        files.update({name: dataset_file(name, root) for name in wanted & set(DATASETS)})
    if "heldout_corpus" in tasks:
        files["heldout_corpus"] = write_heldout_pages(recipe.data, work / "heldout_corpus.jsonl", page_chars)
    return files


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


def evaluate(
    checkpoint: str | Path,
    suite: str | Suite = "commonsense",
    *,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    track: bool = True,
    bootstrap_iters: int = 1000,
) -> EvalResult:
    """Run ``suite`` (or just ``tasks``) on ``checkpoint``; write ``eval-<suite>-<checkpoint stem>.json`` beside it
    and log ``eval/<task>/<metric>`` into the checkpoint's MLflow run (``track``)."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    tasks = list(tasks) if tasks else suite.tasks
    check_tasks(tasks)
    limit = limit if limit is not None else suite.limit
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be > 0, got {limit}")
    checkpoint = Path(checkpoint)

    from nlplatform.checkpoint import load_checkpoint

    loaded = load_checkpoint(checkpoint, device=device or default_device())
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nlplatform.eval.harness import NLPlatformLM

    lm = NLPlatformLM(model=loaded.model, tokenizer=loaded.tokenizer, max_length=loaded.recipe.data.seq_len,
                      batch_size=batch_size, device=device or default_device(), dtype=dtype)  # fmt: skip
    scratch = cache_root() / "eval"
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tasks-", dir=scratch))
    try:
        render_tasks(work, _data_files(tasks, loaded.recipe, work, suite.page_chars))
        manager = TaskManager(include_path=str(work), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=suite.num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    metrics = flat_metrics(out["results"])
    row = paper_row(metrics)
    if row["Avg"] is not None:  # the paper's Avg (as a fraction, like the scores), the leaderboard's eval column
        metrics[AVG_METRIC] = row["Avg"] / 100
    path = checkpoint.parent / f"eval-{suite.name}-{checkpoint.stem}.json"
    report = {
        "checkpoint": str(checkpoint.resolve()),
        "step": loaded.step,
        "model": loaded.recipe.model.name,
        "preset": loaded.recipe.model.preset,
        "suite": suite.name,
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": suite.num_fewshot,
        "page_chars": suite.page_chars,
        "row": row,
        "metrics": metrics,
        "results": out["results"],
        "n_samples": out.get("n-samples"),
        "versions": out.get("versions"),
    }
    atomic_write_text(path, json.dumps(report, indent=2, default=str) + "\n")
    run_id = log_eval_to_mlflow(checkpoint, metrics, loaded.step, path) if track else None
    return EvalResult(path=path, metrics=metrics, row=row, mlflow_run_id=run_id)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
