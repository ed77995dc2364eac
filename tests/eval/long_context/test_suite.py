"""`nlplatform eval CHECKPOINT --suite long_context` end to end on tiny checkpoints of two families, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eval.conftest import checkpoint_of
from tests.train.conftest import needs_corpus, run_cli

SMALL = ["--limit", "1", "--depths", "0,1", "--probes", "niah_single_passkey,niah_multikey_number,passkey"]


@needs_corpus
@pytest.mark.parametrize("family", ["transformer", "deltanet"])
def test_long_context_suite_writes_scores_plots_and_mlflow_metrics(family, trained_run, family_run, tmp_path):
    """Probes at the trained length and beyond it (the trained Transformer++ saw 64 tokens, DeltaNet 128): the JSON
    beside the checkpoint holds every probe's score and the loss by position, the three PNGs are written beside it,
    and the summary metrics and the plots land in the checkpoint's MLflow run. Cells too short for a task's needles
    are reported as skipped, not failed."""
    from mlflow.tracking import MlflowClient

    ckpt, uri = checkpoint_of(family, trained_run, family_run)
    proc = run_cli("eval", str(ckpt), "--suite", "long_context", *SMALL, "--lengths", "128,400", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == ckpt.parent / "eval-long_context-last.json"
    report = json.loads(path.read_text())
    trained = report["trained_length"]
    assert report["model"] == family and trained == {"transformer": 64, "deltanet": 128}[family]
    assert {(s["task"], s["length"]) for s in report["scores"]} >= {("passkey", 128), ("niah_single_passkey", 400)}
    assert {(s["task"], s["length"]) for s in report["skipped"]} == {
        ("niah_single_passkey", 128),
        ("niah_multikey_number", 128),
    }
    assert all(1 <= s["rank"] <= s["candidates"] == 10 for s in report["scores"])
    assert report["position_bins"][-1]["end"] == 400
    for name in ("heatmap", "length", "position"):
        assert (ckpt.parent / f"eval-long_context-last-{name}.png").stat().st_size > 10_000
    assert "| exact |" in proc.stdout and "| top1 |" in proc.stdout

    run = MlflowClient(uri).get_run(json.loads((ckpt.parent.parent / "run.json").read_text())["mlflow_run_id"])
    for key in (
        "eval/long_context/all/exact_beyond",
        "eval/long_context/all/top1_beyond",
        "eval/long_context/passkey/top1_len400",
        "eval/long_context/loss_within",
        "eval/long_context/loss_beyond",
    ):
        assert run.data.metrics[key] == pytest.approx(report["metrics"][key]), key
    if trained == 128:
        assert "eval/long_context/all/top1_within" in run.data.metrics
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "eval")}
    assert "eval/eval-long_context-last-heatmap.png" in artifacts and "eval/eval-long_context-last.json" in artifacts


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--probes", "niah_single_digits"], "unknown long-context task(s) niah_single_digits"),
        (["--lengths", "128,abc"], "argument --lengths: expected comma-separated numbers, got '128,abc'"),
        (["--depths", "0,1.5"], "needle depths must be in [0, 1]"),
        (["--limit", "0"], "must be > 0"),
        (["--lengths", "16", "--probes", "passkey"], "no probe fits the lengths [16]"),
    ],
    ids=["unknown-task", "bad-length", "bad-depth", "zero-limit", "too-short"],
)
def test_bad_long_context_arguments_exit_2_with_a_message(args, fragment, trained_run, tmp_path, monkeypatch, capsys):
    """Refused with exit status 2 and a one-line message, before any work (run in process: no start-up cost); a
    malformed number already by the suite's parser."""
    from nlplatform.cli import main

    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["eval", str(ckpt), "--suite", "long_context", *args, "--no-track"])
    except SystemExit as exc:  # a parse error: argparse exits
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert fragment in err.strip().splitlines()[-1] and "Traceback" not in err, err
