"""`make bench-train` (bench/bench_train_step.py): cases in priority order, each written as soon as it is measured,
and a second call runs only the cases the results file lacks. Run in process (the script's ``main``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def bench(load_bench):
    return load_bench("bench_train_step")


def _run(bench, out: Path, families: str) -> dict:
    assert (
        bench.main(
            [
                "--preset",
                "tiny",
                "--families",
                families,
                "--seq-lens",
                "32,64",
                "--tokens-per-step",
                "64",
                "--steps",
                "1",
                "--out",
                str(out),
                "--in-process",
            ]
        )
        == 0
    )
    (path,) = out.glob("train_step-tiny-*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_cases_run_in_priority_order_and_a_second_call_resumes(bench, tmp_path):
    first = _run(bench, tmp_path, "deltanet,transformer")
    # the middle length first, Transformer++ before the others; batch keeps tokens per step at 64
    assert [(r["family"], r["seq_len"], r["batch"]) for r in first["rows"]] == [
        ("transformer", 64, 1),
        ("deltanet", 64, 1),
        ("transformer", 32, 2),
        ("deltanet", 32, 2),
    ]
    assert all(r["tokens_per_sec"] > 0 and r["peak_mem_gib"] > 0 and not r["compile"] for r in first["rows"])
    assert first["rows"][0]["flops_per_token"] > 6 * 1e6 and first["rows"][1]["flops_per_token"] is None
    assert first["meta"]["dtype"] == "fp32" and first["meta"]["device"].startswith("cpu-")
    # on a CPU the ops run their references; Transformer++ has no token-mixer op
    assert [r["kernels"] for r in first["rows"]] == ["-", "reference", "-", "reference"]

    second = _run(bench, tmp_path, "deltanet,transformer,gated_deltanet")
    assert second["rows"][:4] == first["rows"]  # measured cases are kept, not re-run
    assert [(r["family"], r["seq_len"]) for r in second["rows"][4:]] == [("gated_deltanet", 64), ("gated_deltanet", 32)]
    table = next(tmp_path.glob("train_step-tiny-*.md")).read_text()
    assert table.count("| transformer | tiny |") == 2 and "| gated_deltanet | tiny |" in table
    # each family's tokens/s at the longest length over the shortest, at equal tokens per step
    scaling = next(line for line in table.splitlines() if line.startswith("tokens/s at T=64 / at T=32"))
    assert [part.split()[0] for part in scaling.split(": ")[1].split(", ")] == [
        "transformer",
        "deltanet",
        "gated_deltanet",
    ]
    assert "batch 1" not in table  # T=32 ran at batch 2 so far


def test_rows_at_batch_1_give_the_cost_per_token_against_the_length_alone(bench, tmp_path):
    """``--tokens-per-step`` at most the shortest length runs every length at batch 1, beside the equal-tokens rows."""
    _run(bench, tmp_path, "transformer")
    assert (
        bench.main(
            [
                "--preset",
                "tiny",
                "--families",
                "transformer",
                "--seq-lens",
                "32,64",
                "--tokens-per-step",
                "32",
                "--steps",
                "1",
                "--out",
                str(tmp_path),
                "--in-process",
            ]
        )
        == 0
    )
    rows = json.loads(next(tmp_path.glob("train_step-tiny-*.json")).read_text())["rows"]
    assert [(r["seq_len"], r["batch"]) for r in rows] == [(64, 1), (32, 2), (32, 1)]  # T=64 x1 was not re-run
    lines = next(tmp_path.glob("train_step-tiny-*.md")).read_text().splitlines()
    assert any(
        line.startswith("tokens/s at T=64 / at T=32, equal tokens per step (eager): transformer ") for line in lines
    )
    assert any(line.startswith("tokens/s at T=64 / at T=32, batch 1 (eager): transformer ") for line in lines)


def test_an_unknown_family_exits_2_naming_the_known_ones(bench, tmp_path, capsys):
    assert bench.main(["--families", "transformer,mamba", "--out", str(tmp_path)]) == 2
    assert "unknown families ['mamba']" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_cases_triton_calls_are_counted_and_the_entry_points_restored(bench):
    """On CUDA a row says "triton" only if an op's Triton entry point ran: the counter sees the call (here in the
    interpreter) and the op's module gets its own function back afterwards."""
    pytest.importorskip("triton")
    import torch

    from kernels._dispatch import triton_interpreted
    from kernels.titans_memory import autograd, initial_memory_state, titans_memory

    if not (torch.cuda.is_available() or triton_interpreted()):
        pytest.skip("no CUDA device and TRITON_INTERPRET is not set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    real = autograd.triton_titans_memory
    q = torch.nn.functional.normalize(torch.randn(1, 8, 1, 16, device=device), dim=-1)
    gates = [0.1 * torch.rand(1, 8, 1, device=device) for _ in range(3)]
    state = initial_memory_state((torch.randn(1, 16, 16, device=device) / 4,), 1)
    with bench.counting_triton_calls("cuda") as calls:
        titans_memory(q, q, q, *gates, state, chunk_size=4, backend="triton")
        titans_memory(q, q, q, *gates, state, chunk_size=4, backend="reference")
    assert calls["calls"] == 1
    assert autograd.triton_titans_memory is real
