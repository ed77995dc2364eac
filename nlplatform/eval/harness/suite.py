"""``nlplatform eval CHECKPOINT --suite commonsense|smoke|extended``: lm-eval in process on a checkpoint, results
beside it and in MLflow (``nlplatform/eval/report.py``).

The paper-style row (the columns of NeurIPS Table 1 / arXiv Table 2): held-out corpus word perplexity (our stand-in for
WikiText), LAMBADA perplexity and accuracy, PIQA, HellaSwag acc_norm, WinoGrande, ARC-e, ARC-c acc_norm, SIQA, BoolQ,
and Avg = the mean of the eight accuracies.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nlplatform.data import cache_root
from nlplatform.errors import UserError
from nlplatform.eval.checkpoint import default_device, load
from nlplatform.eval.harness.tasks import Suite, check_tasks, load_suite, prepare_tasks
from nlplatform.eval.report import SuiteResult, publish
from nlplatform.leaderboard import AVG_METRIC

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
class EvalResult(SuiteResult):
    row: dict[str, float | None] = field(default_factory=dict)  # paper column -> value (accuracies in %), and "Avg"


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
    device = device or default_device()
    loaded = load(checkpoint, device)
    import lm_eval
    from lm_eval.tasks import TaskManager

    from nlplatform.eval.harness.adapter import NLPlatformLM

    lm = NLPlatformLM(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        max_length=loaded.recipe.data.seq_len,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    scratch = cache_root() / "eval"
    scratch.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tasks-", dir=scratch))
    try:
        prepare_tasks(work, loaded.recipe.data, tasks, suite.page_chars)
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
    fields = {
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": suite.num_fewshot,
        "page_chars": suite.page_chars,
        "row": row,
        "results": out["results"],
        "n_samples": out.get("n-samples"),
        "versions": out.get("versions"),
    }
    result = publish(checkpoint, loaded, suite.name, fields, metrics, track=track)
    return EvalResult(path=result.path, metrics=metrics, mlflow_run_id=result.mlflow_run_id, row=row)
