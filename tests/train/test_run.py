"""End-to-end training through the command line: outputs, the loss, MLflow, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nlplatform.train.run import SUMMARY_KEYS
from tests.train.conftest import run_cli


def test_last_stdout_line_is_the_absolute_run_folder_with_its_files(trained_run):
    """`nlplatform train` prints the run folder last; it holds the recipe, checkpoints, summary and loss curve."""
    run_dir, _, _ = trained_run
    assert run_dir.is_absolute() and run_dir.is_dir()
    for name in ("recipe.yaml", "summary.json", "loss_curve.png", "run.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp*")), "temporary files left behind"
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert recipe["model"]["vocab_size"] == 257  # filled from the byte tokenizer


def test_summary_has_the_contract_keys_and_a_final_validation_at_max_steps(trained_summary, trained_run):
    """summary.json has every contract key; the last validation ran at max_steps and wrote a checkpoint there."""
    assert set(SUMMARY_KEYS) <= set(trained_summary)
    assert trained_summary["steps"] == 30
    assert trained_summary["tokens_seen"] == 30 * 8 * 64
    assert trained_summary["tokens_per_sec"] > 0 and trained_summary["wall_s"] > 0
    ckpt = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 30


def test_loss_falls_and_beats_the_unigram_baseline(trained_summary, trained_run):
    """30 steps lower the training loss from ln(257) and bring validation below the unigram perplexity."""
    from mlflow.tracking import MlflowClient

    _, uri, _ = trained_run
    history = MlflowClient(uri).get_metric_history(trained_summary["mlflow_run_id"], "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert trained_summary["val_ppl"] < trained_summary["unigram_ppl"]


def test_mlflow_run_has_params_metrics_artifacts_and_tags(trained_summary, trained_run):
    """The MLflow run in the sqlite store holds the flattened recipe, step metrics, the artifacts and the tags."""
    from mlflow.tracking import MlflowClient

    _, uri, _ = trained_run
    client = MlflowClient(uri)
    run = client.get_run(trained_summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "transformer" and params["optim.lr"] == "0.01"
    assert params["level.weights.period_steps"] == "1"
    for metric in ("train/loss", "val/loss", "val/ppl", "train/lr", "perf/tokens_per_sec", "levels/weights/updates"):
        assert metric in run.data.metrics, metric
    assert run.data.tags["family"] == "transformer" and run.data.tags["preset"] == "tiny"
    assert run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe.yaml", "summary.json", "loss_curve.png"} <= artifacts


def test_generate_continues_a_prompt_from_a_checkpoint(trained_run, tmp_path):
    """`nlplatform generate` loads a checkpoint and prints the prompt followed by sampled text."""
    run_dir, _, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("generate", str(ckpt), "--prompt", "ROMEO.", "--max-new-tokens", "40", "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ROMEO.") and len(proc.stdout) > len("ROMEO.")
    again = run_cli("generate", str(ckpt), "--prompt", "ROMEO.", "--max-new-tokens", "40", "--seed", "1", cwd=tmp_path)
    assert again.stdout == proc.stdout  # seeded sampling is reproducible


@pytest.mark.slow
def test_generate_with_a_missing_checkpoint_exits_2(tmp_path):
    """A checkpoint path that does not exist is a one-line error with exit status 2."""
    proc = run_cli("generate", str(tmp_path / "nope.ckpt"), "--prompt", "x", cwd=tmp_path)
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_loss_curve_is_a_png(trained_run):
    """The loss-curve artifact is a real PNG image."""
    run_dir, _, _ = trained_run
    assert Path(run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
