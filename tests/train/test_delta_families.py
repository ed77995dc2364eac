"""DeltaNet and Gated DeltaNet train from their tiny recipes through the command line, tracked with their levels."""

from __future__ import annotations

import pytest

from tests.train.conftest import needs_corpus, run_cli

FAMILIES = pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])


@needs_corpus
@FAMILIES
def test_tiny_recipe_trains_30_steps_with_a_falling_loss(family_run, family):
    """30 steps of the tiny recipe lower the training loss by more than 1 nat and beat the unigram baseline."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run(family)
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert summary["steps"] == 30 and summary["val_ppl"] < summary["unigram_ppl"]


@needs_corpus
@FAMILIES
def test_mlflow_lists_the_memory_and_weights_levels(family_run, family):
    """The MLflow run records the family, the model's chunk size and both levels with their scopes."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run(family)
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert params["model.name"] == family and run.data.tags["family"] == family
    assert params["level.memory.scope"] == "in_context" and params["level.memory.chunk_tokens"] == "1"
    assert params["level.weights.scope"] == "persistent" and params["level.weights.period_steps"] == "1"
    assert params["model.chunk_size"] == "64"


@needs_corpus
@FAMILIES
def test_generation_from_a_checkpoint_uses_the_recurrent_state(family_run, family, tmp_path):
    """`nlplatform generate` continues a prompt from the family's checkpoint."""
    run_dir, _, _ = family_run(family)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("generate", str(ckpt), "--prompt", "KING.", "--max-new-tokens", "30", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("KING.") and len(proc.stdout) > len("KING.")
