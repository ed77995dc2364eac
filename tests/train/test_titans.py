"""Titans trains from its tiny recipes (one per variant) through the command line, tracked with its levels."""

from __future__ import annotations

import pytest

from tests.train.conftest import needs_corpus, run_cli

VARIANTS = pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])


@needs_corpus
@VARIANTS
def test_tiny_variant_trains_30_steps_with_a_falling_loss(family_run, variant):
    """30 steps of recipes/titans/tiny_<variant>.yaml lower the training loss by more than 1 nat and beat the unigram
    baseline on validation."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run("titans", f"tiny_{variant}")
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert summary["steps"] == 30 and summary["val_ppl"] < summary["unigram_ppl"]


@needs_corpus
@VARIANTS
def test_mlflow_records_the_variant_and_the_memory_level_at_its_chunk(family_run, variant):
    """The MLflow run records the family, the variant and both levels: the memory in-context at chunk 16 (f = the
    window over 16) and the weights persistent."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run("titans", f"tiny_{variant}")
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert params["model.name"] == "titans" and params["model.variant"] == variant
    assert params["level.memory.scope"] == "in_context" and params["level.memory.chunk_tokens"] == "16"
    assert params["level.weights.scope"] == "persistent" and params["level.weights.period_steps"] == "1"


@needs_corpus
@pytest.mark.parametrize("variant", ["lmm", "mag"])
def test_generation_from_a_checkpoint_decodes_with_the_carried_state(family_run, variant, tmp_path):
    """`nlplatform generate` continues a prompt from a Titans checkpoint (memory state, and a KV cache for mag)."""
    run_dir, _, _ = family_run("titans", f"tiny_{variant}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("generate", str(ckpt), "--prompt", "KING.", "--max-new-tokens", "20", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("KING.") and len(proc.stdout) > len("KING.")
