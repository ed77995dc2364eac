"""What every family's tiny recipes do through the command line: the training loss falls, MLflow records the family
and its levels, and a checkpoint generates. One run per recipe, shared by the session (``family_run``)."""

from __future__ import annotations

import pytest

from tests.conftest import family_run_steps
from tests.train.conftest import needs_corpus, run_cli

RECIPES = [
    ("deltanet", "tiny"),
    ("gated_deltanet", "tiny"),
    ("titans", "tiny_lmm"),
    ("titans", "tiny_mac"),
    ("titans", "tiny_mag"),
    ("titans", "tiny_mal"),
    ("hope", "tiny"),
    ("hope", "tiny_attention"),
]
# The levels each recipe logs besides the persistent weights (HOPE's full table: tests/train/test_hope.py): the
# delta-rule memory updates every token, the Titans memory every 16.
LEVELS = {
    ("deltanet", "tiny"): {"memory": ("in_context", "1")},
    ("gated_deltanet", "tiny"): {"memory": ("in_context", "1")},
    **{("titans", f"tiny_{v}"): {"memory": ("in_context", "16")} for v in ("lmm", "mac", "mag", "mal")},
}
# Generation: every family, and the Titans variants that decode differently (memory only; memory + KV cache)
DECODERS = [r for r in RECIPES if r not in (("titans", "tiny_mac"), ("titans", "tiny_mal"))]


def _ids(cases):
    return [f"{family}-{recipe}" for family, recipe in cases]


def _metric(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize(("family", "recipe"), RECIPES, ids=_ids(RECIPES))
def test_tiny_recipe_trains_with_a_falling_loss(family_run, family, recipe):
    """30 steps of recipes/<family>/<recipe>.yaml (50 for Hope-Attention) lower the training loss by more than 1 nat
    and beat the unigram baseline on validation (HOPE's in-context levels learning inside every forward pass)."""
    _, uri, summary = family_run(family, recipe)
    losses = _metric(uri, summary["mlflow_run_id"], "train/loss")
    assert len(losses) >= 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert summary["steps"] == family_run_steps(family, recipe) and summary["val_ppl"] < summary["unigram_ppl"]


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize(("family", "recipe"), list(LEVELS), ids=_ids(LEVELS))
def test_mlflow_records_the_family_variant_and_levels(family_run, family, recipe):
    """The MLflow run records the family (param and tag), the Titans variant, the model's chunk size, the in-context
    memory at its chunk and the weights persistent, updated every step."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run(family, recipe)
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    params = run.data.params
    assert params["model.name"] == family and run.data.tags["family"] == family
    if family == "titans":
        assert params["model.variant"] == recipe.removeprefix("tiny_")
    else:
        assert params["model.chunk_size"] == "64"
    for level, (scope, chunk) in LEVELS[family, recipe].items():
        assert (params[f"level.{level}.scope"], params[f"level.{level}.chunk_tokens"]) == (scope, chunk)
    assert params["level.weights.scope"] == "persistent" and params["level.weights.period_steps"] == "1"


@needs_corpus
@pytest.mark.slow
@pytest.mark.parametrize(("family", "recipe"), DECODERS, ids=_ids(DECODERS))
def test_generation_from_a_checkpoint_continues_the_prompt(family_run, family, recipe, tmp_path):
    """`nlplatform generate` continues a prompt from the family's checkpoint with its decoding state (recurrent
    state, memory, KV cache, HOPE's learning levels)."""
    run_dir, _, _ = family_run(family, recipe)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    proc = run_cli("generate", str(ckpt), "--prompt", "KING.", "--max-new-tokens", "20", "--seed", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("KING.") and len(proc.stdout) > len("KING.")
