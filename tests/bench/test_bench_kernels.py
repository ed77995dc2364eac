"""`make bench-kernels` (bench/bench_kernels.py) on the CPU at tiny shapes: the Titans memory rows beside the delta
rule's, each op in its own results file, and the columns a GPU fills (Triton, titans-pytorch) wired to the ratios.
Run in process (the script's ``main``), results in a temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY = ["--repeats", "1", "--warmup", "0", "--shapes", "1,16,1,8", "--memory-shapes", "1,16,2,8,2,8;2,8,1,8,1,8"]


@pytest.fixture
def bench(load_bench):
    return load_bench("bench_kernels")


def _results(folder: Path, name: str) -> tuple[dict, str]:
    (path,) = folder.glob(f"{name}-cpu-*.json")
    return json.loads(path.read_text()), path.with_suffix(".md").read_text()


def test_memory_rows_time_the_reference_on_cpu_in_their_own_file(bench, tmp_path):
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 0
    memory, table = _results(tmp_path, "kernels_titans_memory")
    rows = memory["rows"]
    assert [(r["contestant"], r["pass"], r["depth"], r["chunk_size"]) for r in rows] == [
        ("reference", "fwd", 2, 8),
        ("reference", "fwd+bwd", 2, 8),
        ("reference", "fwd", 1, 8),
        ("reference", "fwd+bwd", 1, 8),
    ]
    assert all(r["error"] is None and r["ms_median"] > 0 and r["tokens_per_sec"] > 0 for r in rows)
    assert rows[0]["memory_dims"] == [8, 32, 8] and rows[2]["memory_dims"] == [8, 8]
    assert memory["meta"]["shapes"] == [[1, 16, 2, 8, 2, 8], [2, 8, 1, 8, 1, 8]]
    assert memory["meta"]["max_grad_norm"] == 1.0 and memory["meta"]["dtype"] == "float32"
    assert set(memory["meta"]["skipped"]) == {"triton", "titans_pytorch"}
    assert "| 1x16x2x8 | depth 2, x4 | 8 | fwd+bwd | - |" in table and "not measured in this run" in table
    delta, _ = _results(tmp_path, "kernels")  # the delta rule's file is unchanged in form
    assert {r["contestant"] for r in delta["rows"]} == {"reference"} and len(delta["rows"]) == 4


def test_ops_picks_which_files_are_written(bench, tmp_path):
    assert bench.main([*TINY, "--ops", "titans_memory", "--out", str(tmp_path)]) == 0
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["kernels_titans_memory"] * 2
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--ops", "delta_rule,mamba", "--out", str(tmp_path)])
    assert exit_.value.code == 2


def test_gpu_columns_become_ratios_or_error_rows(bench, tmp_path, monkeypatch):
    """Where a GPU runs all three contestants. Stand-ins keep it quick and independent of the Triton kernel: "triton"
    runs the reference on the depth-2 memory and runs out of memory on the depth-1 one (error rows; the run goes on);
    the peer is titans-pytorch on the CPU."""
    pytest.importorskip("titans_pytorch")
    version, _ = bench.peer_version()
    monkeypatch.setattr(bench, "memory_contestants", lambda run: (list(bench.MEMORY_CONTESTANTS), {}, version))
    op = bench.titans_memory

    def triton_stand_in(q, k, v, theta, eta, alpha, state, *, backend, **kw):
        if backend == "triton" and len(state.weights) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return op(q, k, v, theta, eta, alpha, state, backend="reference", **kw)

    monkeypatch.setattr(bench, "titans_memory", triton_stand_in)
    args = ["--ops", "titans_memory", "--memory-shapes", "1,16,2,8,2,8;1,16,2,8,1,8", "--repeats", "1", "--warmup", "0"]
    assert bench.main([*args, "--out", str(tmp_path)]) == 0
    memory, table = _results(tmp_path, "kernels_titans_memory")
    by = {(r["contestant"], r["pass"], r["depth"]): r for r in memory["rows"]}
    for pass_ in ("fwd", "fwd+bwd"):
        triton, reference, peer = (by[c, pass_, 2] for c in bench.MEMORY_CONTESTANTS)
        assert triton["speedup_over_reference"] == pytest.approx(reference["ms_median"] / triton["ms_median"])
        assert triton["speedup_over_peer"] == pytest.approx(peer["ms_median"] / triton["ms_median"])
        assert reference["speedup_over_peer"] == pytest.approx(peer["ms_median"] / reference["ms_median"])
        failed = by["triton", pass_, 1]
        assert failed["error"].startswith("OutOfMemoryError") and failed["speedup_over_reference"] is None
        assert by["reference", pass_, 1]["speedup_over_peer"] is not None
    assert "| depth 1 (linear) | 8 | fwd+bwd | OOM |" in table and "depth-2 rows (lowest" in table
    assert f"titans-pytorch {version} is NeuralMemory" in table
