"""`nlplatform eval CHECKPOINT --suite continual` end to end on tiny checkpoints of two families, offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.eval.conftest import ROOT, checkpoint_of, needs_eval_data
from tests.train.conftest import needs_corpus, run_cli


@needs_corpus
@needs_eval_data
@pytest.mark.parametrize("family", ["transformer", "deltanet"])
def test_continual_suite_writes_the_forgetting_matrices_and_their_scores(family, trained_run, family_run, tmp_path):
    """Both protocols, two stages each of two fine-tuning steps. Domains: a 3 x 3 perplexity matrix per mode (start
    and one row per stage; the two domains and the checkpoint's corpus). Classes: 2 x 2 accuracy matrices, class-IL
    and task-IL, the task not learned yet blank. The scores computed from them, both heatmaps, all in MLflow."""
    from mlflow.tracking import MlflowClient

    from nlplatform.eval.continual.scores import continual_scores

    ckpt, uri = checkpoint_of(family, trained_run, family_run)
    proc = run_cli(
        "eval",
        str(ckpt),
        "--suite",
        "continual",
        "--domains",
        "encyclopedia,howto",
        "--class-tasks",
        "banking,travel",
        "--stage-steps",
        "2",
        "--limit",
        "2",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path == ckpt.parent / "eval-continual-last.json"
    report = json.loads(path.read_text())
    domains, classes = report["domains"], report["classes"]
    assert domains["stages"] == ["start", "encyclopedia", "howto"]
    assert domains["columns"] == ["encyclopedia", "howto", "corpus"]
    metrics = report["metrics"]
    for mode in ("frozen", "ttl"):
        matrix = domains["perplexity"][mode]
        assert len(matrix) == 3 and all(len(row) == 3 and all(1 < x < 1e4 for x in row) for row in matrix)
        expected = continual_scores([row[:2] for row in matrix[1:]], higher_is_better=False, baseline=matrix[0][:2])
        for key, value in expected.items():
            assert metrics[f"eval/continual/{mode}/{key}"] == pytest.approx(value)
        assert metrics[f"eval/continual/{mode}/corpus_ppl_end"] == pytest.approx(matrix[-1][2])
    assert classes["tasks"] == ["banking", "travel"] and classes["chance_class_il"] == pytest.approx([1 / 3, 1 / 6])
    for setting in ("class_il", "task_il"):
        (a, blank), (b, c) = classes["accuracy"][setting]
        assert math.isnan(blank) and all(6 * x == pytest.approx(round(6 * x)) for x in (a, b, c))  # 6 test utterances
        expected = continual_scores(classes["accuracy"][setting])
        assert {k: metrics[f"eval/continual/{setting}/{k}"] for k in expected} == pytest.approx(expected)
    for name in ("matrix", "classes"):
        assert (ckpt.parent / f"eval-continual-last-{name}.png").stat().st_size > 10_000
    assert all(f"| {kind} |" in proc.stdout for kind in ("frozen", "ttl", "class_il", "task_il"))

    run = MlflowClient(uri).get_run(json.loads((ckpt.parent.parent / "run.json").read_text())["mlflow_run_id"])
    for key in ("eval/continual/frozen/forgetting", "eval/continual/class_il/average"):
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval-continual-last-matrix.png", "eval/eval-continual-last-classes.png"} <= artifacts


@pytest.mark.parametrize("family", ["transformer", "deltanet", "titans", "hope"])
def test_reading_one_window_as_a_stream_is_reading_it_frozen(family):
    """Test-time learning differs from frozen reading only across windows: on a single window the decoding state
    gives the loss of the plain forward pass."""
    from nlplatform.eval.continual.domains import held_out_loss
    from nlplatform.recipe import load_recipe
    from nlplatform.registry import build_model

    recipe = load_recipe(
        ROOT / "recipes" / family / "tiny.yaml", ["model.vocab_size=257", "model.d_model=64", "model.n_layers=2"]
    )
    torch.manual_seed(0)
    model = build_model(recipe.model)
    window = torch.randint(0, 257, (1, 65))
    assert held_out_loss(model, window, "ttl") == pytest.approx(held_out_loss(model, window, "frozen"), abs=1e-5)
    two = torch.randint(0, 257, (2, 65))
    assert held_out_loss(model, two, "ttl") != held_out_loss(model, two, "frozen")  # the state carries over


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--domains", "encyclopedia,poetry"], "unknown continual domain(s) poetry"),
        (["--domains", "howto"], "give at least 2 different domains"),
        (["--stage-steps", "0"], "stage steps must be > 0"),
        (["--class-tasks", "banking,gardening"], "unknown continual intent task(s) gardening"),
        (["--class-tasks", "home,home"], "give at least 2 different intent tasks"),
    ],
    ids=["unknown-domain", "one-domain", "zero-steps", "unknown-intent-task", "repeated-task"],
)
def test_bad_continual_arguments_exit_2_with_a_message(args, fragment, trained_run, tmp_path, monkeypatch, capsys):
    """Refused with exit status 2 and a one-line message, before any work (run in process: no start-up cost)."""
    from nlplatform.cli import main

    ckpt, _ = checkpoint_of("transformer", trained_run, None)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(ckpt), "--suite", "continual", *args, "--no-track"]) == 2
    assert fragment in capsys.readouterr().err
