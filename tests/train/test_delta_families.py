"""DeltaNet and Gated DeltaNet train from their tiny recipes through the command line, tracked with their levels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.train.conftest import ROOT, needs_corpus, run_cli

# The tiny recipes as written (tiny preset, their optimizer settings), on shorter and fewer windows so 50 steps
# take seconds.
SHORT = [
    "data.seq_len=128",
    "data.batch_size=4",
    "data.val_batches=2",
    "optim.warmup_steps=5",
    "trainer.max_steps=50",
    "trainer.val_check_interval=25",
    "trainer.log_every_n_steps=2",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module", params=["deltanet", "gated_deltanet"])
def family_run(request, tmp_path_factory):
    family = request.param
    work = tmp_path_factory.mktemp(family)
    uri = f"sqlite:///{work / 'mlruns.db'}"
    recipe = ROOT / "recipes" / family / "tiny.yaml"
    proc = run_cli("train", str(recipe), *SHORT, f"output_dir={work / 'runs'}", f"tracking.tracking_uri={uri}",
                   "tracking.experiment=tests", cwd=work)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    return family, run_dir, uri, json.loads((run_dir / "summary.json").read_text())


@needs_corpus
def test_tiny_recipe_trains_50_steps_with_a_falling_loss(family_run):
    """50 steps of the tiny recipe lower the training loss by more than 1 nat and beat the unigram baseline."""
    from mlflow.tracking import MlflowClient

    _, _, uri, summary = family_run
    history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) >= 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert summary["steps"] == 50 and summary["val_ppl"] < summary["unigram_ppl"]


@needs_corpus
def test_mlflow_lists_the_memory_and_weights_levels(family_run):
    """The MLflow run records the family, the model's chunk size and both levels with their scopes."""
    from mlflow.tracking import MlflowClient

    family, _, uri, summary = family_run
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert params["model.name"] == family and run.data.tags["family"] == family
    assert params["level.memory.scope"] == "in_context" and params["level.memory.chunk_tokens"] == "1"
    assert params["level.weights.scope"] == "persistent" and params["level.weights.period_steps"] == "1"
    assert params["model.chunk_size"] == "64"


@needs_corpus
def test_generation_from_a_checkpoint_uses_the_recurrent_state(family_run, tmp_path):
    """`nlplatform generate` continues a prompt from the family's checkpoint."""
    _, run_dir, _, _ = family_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("generate", str(ckpt), "--prompt", "KING.", "--max-new-tokens", "30", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("KING.") and len(proc.stdout) > len("KING.")
