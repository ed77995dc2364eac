"""`make bench-kernels` (``python -m bench.ops``) on the CPU at tiny shapes: each op in its own results file, every
contestant that runs here measured in the same run, and the columns a GPU fills (Triton, fla, titans-pytorch) wired
to the ratios, with stand-ins where the real ones need a GPU or are not installed. Run in process (``main``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import ops
from bench.ops import delta_rule, titans_memory

TINY = ["--repeats", "1", "--warmup", "0", "--shapes", "1,16,1,8", "--memory-shapes", "1,16,2,8,2,8;2,8,1,8,1,8"]


def _results(folder: Path, name: str) -> tuple[dict, str]:
    (path,) = folder.glob(f"{name}-cpu-*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


@pytest.fixture
def no_peer(monkeypatch):
    """titans-pytorch absent, whether or not this environment has it."""
    monkeypatch.setattr(titans_memory, "peer_version", lambda: (None, "not installed (test)"))


@pytest.mark.slow
def test_a_cpu_run_times_the_pytorch_contestants_of_both_ops_each_in_its_own_file(tmp_path, no_peer):
    assert ops.main([*TINY, "--out", str(tmp_path)]) == 0
    memory, table = _results(tmp_path, "kernels_titans_memory")
    rows = memory["rows"]
    assert [(r["contestant"], r["pass"], r["depth"], r["chunk_size"]) for r in rows] == [
        ("reference", "fwd", 2, 8),
        ("reference", "fwd+bwd", 2, 8),
        ("reference", "step", 2, 8),
        ("reference", "fwd", 1, 8),
        ("reference", "fwd+bwd", 1, 8),
        ("reference", "step", 1, 8),
    ]
    assert all(r["error"] is None and r["ms_median"] > 0 and r["tokens_per_sec"] > 0 for r in rows)
    assert rows[0]["memory_dims"] == [8, 32, 8] and rows[3]["memory_dims"] == [8, 8]
    assert memory["meta"]["shapes"] == [[1, 16, 2, 8, 2, 8], [2, 8, 1, 8, 1, 8]]
    assert memory["meta"]["max_grad_norm"] == 1.0 and memory["meta"]["dtype"] == "float32"
    assert set(memory["meta"]["skipped"]) == {"triton", "titans_pytorch"}
    assert "| 1x16x2x8 | depth 2, x4 | 8 | step | - |" in table and "not measured in this run" in table

    delta, table = _results(tmp_path, "kernels")
    got = [(r["contestant"], r["variant"], r["pass"]) for r in delta["rows"]]
    assert got == [
        ("reference", "gated", "fwd"),
        ("sdpa", None, "fwd"),  # no decay: one figure serves both variants
        ("reference", "gated", "fwd+bwd"),
        ("sdpa", None, "fwd+bwd"),
        ("reference", "ungated", "fwd"),
        ("reference", "ungated", "fwd+bwd"),
    ]
    assert all(r["error"] is None and r["ms_median"] > 0 for r in delta["rows"])
    assert set(delta["meta"]["skipped"]) == {"triton", "fla"} and delta["meta"]["chunk_size"] == 64
    sdpa_fwd = next(r for r in delta["rows"] if r["contestant"] == "sdpa")
    assert "| 1x16x1x8 | ungated | fwd | - | " in table and f" | - | {delta_rule.fmt_ms(sdpa_fwd)} | - |" in table


@pytest.mark.slow
def test_ops_picks_which_files_are_written_and_bad_options_exit_2(tmp_path, no_peer):
    assert ops.main([*TINY, "--ops", "titans_memory", "--out", str(tmp_path)]) == 0
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["kernels_titans_memory"] * 2
    for bad in (["--ops", "delta_rule,mamba"], ["--memory-shapes", "1,16,2,8,2"], ["--shapes", "1,16,0,8"]):
        with pytest.raises(SystemExit) as exit_:
            ops.main([*bad, "--out", str(tmp_path / "bad")])
        assert exit_.value.code == 2
    assert not (tmp_path / "bad").exists()


class PeerStandIn(torch.nn.Module):
    """NeuralMemory's interface (x -> (y, state)) around our layer on the reference."""

    def __init__(self, shape: tuple):
        super().__init__()
        _, _, H, D, depth, chunk = shape
        self.layer = titans_memory.MemoryLayer(H, D, depth, chunk, "reference")

    def forward(self, x):
        return self.layer(x), None


@pytest.mark.slow
def test_titans_memory_gpu_columns_become_ratios_or_error_rows(tmp_path, monkeypatch):
    """Where a GPU runs all three contestants. Stand-ins keep it quick and independent of the Triton kernel and of
    titans-pytorch: "triton" runs the reference on the depth-2 memory and runs out of memory on the depth-1 one
    (error rows; the run goes on); the peer is our layer behind NeuralMemory's interface."""
    monkeypatch.setattr(titans_memory, "contestants", lambda run: (list(titans_memory.CONTESTANTS), {}, "stand-in"))
    monkeypatch.setattr(titans_memory, "peer_model", lambda shape, device: PeerStandIn(shape).to(device))
    op = titans_memory.titans_memory

    def triton_stand_in(q, k, v, theta, eta, alpha, state, *, backend, **kw):
        if backend == "triton" and len(state.weights) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return op(q, k, v, theta, eta, alpha, state, backend="reference", **kw)

    monkeypatch.setattr(titans_memory, "titans_memory", triton_stand_in)
    args = ["--ops", "titans_memory", "--memory-shapes", "1,16,2,8,2,16;1,16,2,8,1,8", "--repeats", "1"]
    assert ops.main([*args, "--warmup", "0", "--out", str(tmp_path)]) == 0
    memory, table = _results(tmp_path, "kernels_titans_memory")
    by = {(r["contestant"], r["pass"], r["depth"]): r for r in memory["rows"]}
    for pass_ in ("fwd", "fwd+bwd", "step"):
        triton, reference, peer = (by[c, pass_, 2] for c in titans_memory.CONTESTANTS)
        assert peer["error"] is None
        assert triton["speedup_over_reference"] == pytest.approx(reference["ms_median"] / triton["ms_median"])
        assert triton["speedup_over_peer"] == pytest.approx(peer["ms_median"] / triton["ms_median"])
        assert reference["speedup_over_peer"] == pytest.approx(peer["ms_median"] / reference["ms_median"])
        assert peer["speedup_over_reference"] is None and peer["speedup_over_peer"] is None
        failed = by["triton", pass_, 1]
        assert failed["error"].startswith("OutOfMemoryError") and failed["speedup_over_reference"] is None
        assert by["reference", pass_, 1]["speedup_over_peer"] is not None
    assert "| depth 1 (linear) | 8 | fwd+bwd | OOM |" in table and "| depth 1 (linear) | 8 | step | OOM |" in table
    # the kernel goal counts the depth-2 fwd and fwd+bwd rows, the peer goal the chunk-16 step rows of ours
    assert "met in 0 of 2 depth-2 fwd and fwd+bwd rows (lowest" in table  # stand-in triton: the reference's speed
    assert "met in 0 of 2 chunk-16 step rows of ours (lowest" in table
    assert "titans-pytorch stand-in is NeuralMemory" in table and memory["meta"]["errors"] == 3


@pytest.mark.slow
def test_the_titans_pytorch_peer_runs_every_pass(tmp_path):
    """The real peer, where it is installed: its forward, backward and AdamW step at two heads (its per-head initial
    weights are a stride-0 view until the benchmark gives each head its own copy)."""
    pytest.importorskip("titans_pytorch")
    args = ["--ops", "titans_memory", "--memory-shapes", "1,16,2,8,2,8", "--repeats", "1", "--warmup", "1"]
    assert ops.main([*args, "--out", str(tmp_path)]) == 0
    memory, _ = _results(tmp_path, "kernels_titans_memory")
    peer = [r for r in memory["rows"] if r["contestant"] == "titans_pytorch"]
    assert [r["pass"] for r in peer] == ["fwd", "fwd+bwd", "step"] and all(r["error"] is None for r in peer)
    assert memory["meta"]["titans_pytorch_version"]


@pytest.mark.slow
def test_delta_rule_gpu_columns_become_ratios_or_error_rows(tmp_path, monkeypatch):
    """Stand-ins for the GPU contestants: "triton" runs the reference on the gated variant and runs out of memory on
    the ungated one; "fla" is the reference behind fla's keyword interface (with its head_first flag)."""
    op = delta_rule.gated_delta_rule
    layouts = []

    def fla_stand_in(q, k, v, beta, scale, output_final_state, g=None, head_first=True):
        layouts.append(head_first)
        return op(q, k, v, beta, g, scale=scale, backend="reference")

    def triton_stand_in(q, k, v, beta, g, *, backend, **kw):
        if backend == "triton" and g is None:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return op(q, k, v, beta, g, backend="reference", **kw)

    fla_ops = {"gated": fla_stand_in, "ungated": fla_stand_in}
    monkeypatch.setattr(delta_rule, "contestants", lambda run: (list(delta_rule.CONTESTANTS), {}, fla_ops))
    monkeypatch.setattr(delta_rule, "gated_delta_rule", triton_stand_in)
    args = ["--ops", "delta_rule", "--shapes", "1,16,1,8", "--repeats", "1", "--warmup", "0", "--chunk-size", "16"]
    assert ops.main([*args, "--out", str(tmp_path)]) == 0
    delta, table = _results(tmp_path, "kernels")
    by = {(r["contestant"], r["variant"], r["pass"]): r for r in delta["rows"]}
    assert layouts and not any(layouts)  # fla is called in the [B, T, H, D] layout
    for pass_ in ("fwd", "fwd+bwd"):
        fla = by["fla", "gated", pass_]
        for ours in ("triton", "reference"):
            row = by[ours, "gated", pass_]
            assert row["ratio_to_fla"] == pytest.approx(row["ms_median"] / fla["ms_median"])
        failed = by["triton", "ungated", pass_]
        assert failed["error"].startswith("OutOfMemoryError") and failed["ratio_to_fla"] is None
        assert by["reference", "ungated", pass_]["ratio_to_fla"] is not None
        assert by["sdpa", None, pass_]["error"] is None
    assert "| 1x16x1x8 | ungated | fwd+bwd | OOM |" in table and delta["meta"]["chunk_size"] == 16
    gated = by["triton", "gated", "fwd"]
    assert f"| 1x16x1x8 | gated | fwd | {delta_rule.fmt_ms(gated)} |" in table
    assert f"| {delta_rule.fmt_ratio(gated['ratio_to_fla'])} | " in table
