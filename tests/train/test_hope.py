"""HOPE's own training properties through the command line: its level table (three CMS frequencies among them),
level stacking from a Transformer++, and the refusal of checkpoints of an older format. What every family shares
(a falling loss, its levels in MLflow, generation) is tests/train/test_families.py."""

from __future__ import annotations

from tests.train.conftest import ROOT, needs_corpus


def _metric(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(history, key=lambda m: m.step)]


@needs_corpus
def test_levels_are_logged_with_their_chunks_scopes_and_update_counts(family_run):
    """The run logs every level of tiny HOPE (512 tokens per step in the test runs): the self-modifying memories
    in-context at chunks 16 and 64, cms.0 in-context at 64, cms.1 / cms.2 persistent every 4 / 16 steps, and the
    persistent levels' update counts (7 and 1 after 30 steps); summary.json lists the same table."""
    from mlflow.tracking import MlflowClient

    _, uri, summary = family_run("hope", "tiny")
    run_id = summary["mlflow_run_id"]
    params = MlflowClient(uri).get_run(run_id).data.params
    assert params["model.name"] == "hope" and params["data.seq_len"] == "128" and "model.context_len" not in params
    expected = {
        "memory": ("in_context", "16", "None"),
        "projections": ("in_context", "64", "None"),
        "cms.0": ("in_context", "64", "None"),
        "cms.1": ("persistent", "2048", "4"),
        "cms.2": ("persistent", "8192", "16"),
        "weights": ("persistent", "512", "1"),
    }
    for level, (scope, chunk, period) in expected.items():
        got = tuple(params[f"level.{level}.{k}"] for k in ("scope", "chunk_tokens", "period_steps"))
        assert got == (scope, chunk, period), level
    assert len({row["chunk_tokens"] for row in summary["levels"]}) >= 4
    assert _metric(uri, run_id, "levels/cms.1/updates")[-1] == 7
    assert _metric(uri, run_id, "levels/cms.2/updates")[-1] == 1


@needs_corpus
def test_level_stacking_from_a_trained_transformer_reproduces_it_then_trains(trained_run, tmp_path):
    """Ad-hoc level stacking (arXiv §7.3): a Hope-Attention with one CMS level as wide as a trained Transformer++'s
    MLP, stacked from its checkpoint, computes the same logits; with two levels (one in-context) both start from that
    MLP; `model.stack_from` starts a training run from it, and a missing checkpoint is refused with exit code 2."""
    import torch

    from nlplatform.checkpoint import load_checkpoint
    from nlplatform.registry import build_model, model_config
    from tests.train.conftest import FAST, run_cli

    run_dir, _, _ = trained_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    source = load_checkpoint(ckpt).model
    sizes = dict(d_model=source.cfg.d_model, n_layers=source.cfg.n_layers, n_heads=source.cfg.n_heads)
    common = dict(vocab_size=source.cfg.vocab_size, variant="attention", cms_hidden=source.cfg.hidden_dim, **sizes)
    ids = torch.randint(0, source.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    one = build_model(model_config("hope", "tiny", cms_chunk_sizes=[1 << 20], **common)).eval()
    one.stack_levels(source.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(one(ids), source(ids), rtol=1e-5, atol=1e-5)
    two = build_model(model_config("hope", "tiny", cms_chunk_sizes=[16, 1 << 20], context_len=64, **common))
    two.stack_levels(source.state_dict())
    for w in ("w1", "w2", "w3"):
        expected = getattr(source.layers[1].mlp, w).weight
        assert all(torch.equal(getattr(m, w).weight, expected) for m in two.layers[1].cms.mlps)

    recipe = ROOT / "recipes" / "hope" / "tiny_attention.yaml"
    args = [
        *FAST,
        "model.cms_chunk_sizes=[16,2048]",
        f"model.cms_hidden={source.cfg.hidden_dim}",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "tracking.enabled=false",
    ]
    proc = run_cli(
        "train", str(recipe), *args, f"model.stack_from={ckpt}", f"output_dir={tmp_path / 'runs'}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stacked levels from" in proc.stderr
    bad = run_cli(
        "train",
        str(recipe),
        *args,
        f"model.stack_from={tmp_path / 'missing.ckpt'}",
        f"output_dir={tmp_path / 'bad'}",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr
    assert not (tmp_path / "bad").exists()


@needs_corpus
def test_a_hope_checkpoint_of_the_linearised_format_is_refused_by_generate_eval_and_resume(family_run, tmp_path):
    """HOPE checkpoints record model format 2 (the exact chunked DGD). One from before (format 1, no ``model_format``:
    trained under the chunk-start linearisation) is refused with one line and exit code 2 by everything that loads
    weights: generate, eval (through the same loader) and trainer.resume, which writes nothing."""
    import torch

    from tests.train.conftest import run_cli
    from tests.train.test_cli_errors import assert_bad_input

    run_dir, _, _ = family_run("hope", "tiny")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["model_format"] == 2
    del state["model_format"]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    expected = ("holds a hope model of format 1", "format 2", "train it again")
    gen = run_cli("generate", str(old), "--prompt", "To be", "--max-new-tokens", "2", cwd=tmp_path)
    assert_bad_input(gen, *expected)
    assert len(gen.stderr.strip().splitlines()) == 1
    ev = run_cli("eval", str(old), "--suite", "smoke", "--limit", "1", cwd=tmp_path)
    assert_bad_input(ev, *expected)
    resumed = run_cli(
        "train",
        str(ROOT / "recipes" / "hope" / "tiny.yaml"),
        f"trainer.resume={old}",
        f"output_dir={tmp_path / 'runs'}",
        "tracking.enabled=false",
        cwd=tmp_path,
    )
    assert_bad_input(resumed, *expected)
    assert not (tmp_path / "runs").exists()
