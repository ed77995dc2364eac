"""`nlplatform eval CHECKPOINT --suite smoke|extended` end to end on tiny checkpoints of every family: the paper row,
the JSON, MLflow, bad input; and `python -m nlplatform.eval.harness`, lm-eval's own command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nlplatform.eval.harness.suite import COLUMNS
from tests.eval.conftest import checkpoint_of, needs_eval_data
from tests.train.conftest import needs_corpus, run_cli


@needs_corpus
@needs_eval_data
@pytest.mark.parametrize("family", ["transformer", "deltanet", "gated_deltanet"])
def test_smoke_suite_gives_every_paper_column_and_logs_into_the_checkpoints_run(
    family, trained_run, family_run, tmp_path
):
    """The smoke suite scores all nine tasks offline, writes the JSON beside the checkpoint (its path printed last)
    and logs eval/<task>/<metric> (and the paper's Avg as eval/avg) into the run that trained the checkpoint."""
    from mlflow.tracking import MlflowClient

    ckpt, uri = checkpoint_of(family, trained_run, family_run)
    proc = run_cli("eval", str(ckpt), "--suite", "smoke", "--limit", "2", "--batch-size", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.parent == ckpt.parent and path.name == "eval-smoke-last.json"
    report = json.loads(path.read_text())
    assert report["model"] == family and report["limit"] == 2
    for column, *_ in COLUMNS:
        assert report["row"][column] is not None, column
    assert 0 <= report["row"]["Avg"] <= 100
    assert "| Wiki ppl | LMB ppl | LMB acc | PIQA |" in proc.stdout

    run = MlflowClient(uri).get_run(json.loads((ckpt.parent.parent / "run.json").read_text())["mlflow_run_id"])
    for key in (
        "eval/piqa/acc",
        "eval/hellaswag/acc_norm",
        "eval/lambada_openai/perplexity",
        "eval/heldout_corpus/word_perplexity",
        "eval/boolq/acc",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["eval/piqa/acc"] == pytest.approx(report["metrics"]["eval/piqa/acc"])
    assert run.data.metrics["eval/avg"] == pytest.approx(report["row"]["Avg"] / 100)  # the leaderboard's eval column


@needs_corpus
@needs_eval_data
def test_lm_eval_command_line_runs_our_model_and_tasks(trained_run, tmp_path):
    """`python -m nlplatform.eval.harness` is lm-eval's own CLI with the nlplatform model and the offline tasks."""
    import subprocess
    import sys

    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlplatform.eval.harness",
            "--model",
            "nlplatform",
            "--model_args",
            f"pretrained={ckpt}",
            "--tasks",
            "arc_easy,heldout_corpus",
            "--limit",
            "2",
            "--batch_size",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arc_easy" in proc.stdout and "word_perplexity" in proc.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tasks", "piqa,hellaswg"], "Did you mean 'hellaswag'"),
        (["--suite", "commonsens"], "Did you mean 'commonsense'"),
        (["--limit", "0", "--tasks", "piqa"], "--limit must be > 0"),
    ],
    ids=["unknown-task", "unknown-suite", "zero-limit"],
)
def test_bad_eval_arguments_exit_2_with_a_hint(args, fragment, trained_run, tmp_path):
    """Unknown tasks or suites and an impossible limit are one-line errors with exit status 2."""
    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    proc = run_cli("eval", str(ckpt), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert fragment in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_missing_or_foreign_checkpoint_exits_2(tmp_path):
    """A checkpoint that does not exist, or a file that is not one of ours, is refused with exit status 2."""
    missing = run_cli("eval", str(tmp_path / "nope.ckpt"), "--tasks", "piqa", cwd=tmp_path)
    assert missing.returncode == 2 and "not found" in missing.stderr
    import torch

    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    proc = run_cli("eval", str(foreign), "--tasks", "piqa", cwd=tmp_path)
    assert proc.returncode == 2 and "not an nlplatform training checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_eval_data_without_network_names_the_command(trained_run, tmp_path):
    """With no eval data in the cache and no way to fetch it, eval exits 2 naming `make eval-data`."""
    import subprocess
    import sys

    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    env = {
        **os.environ,
        "NLPLATFORM_CACHE": str(tmp_path / "empty-cache"),
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(tmp_path),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "nlplatform", "eval", str(ckpt), "--tasks", "piqa"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "make eval-data" in proc.stderr and "Traceback" not in proc.stderr


@needs_corpus
@needs_eval_data
def test_extended_suite_tasks_run_offline(trained_run, tmp_path):
    """OpenBookQA, SciQ, COPA and CommonsenseQA (the rest of the offline data) score through the same path."""
    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    tasks = "openbookqa,sciq,copa,commonsense_qa"
    proc = run_cli(
        "eval", str(ckpt), "--suite", "extended", "--tasks", tasks, "--limit", "2", "--no-track", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    for task in tasks.split(","):
        assert 0 <= report["metrics"][f"eval/{task}/acc"] <= 1, task
