"""The delta-rule op against its peers: forward and forward + backward, ms, tokens/s, peak memory.

For each shape (B, T, H, D) with K = V = D, each variant (gated: with the log decay g, i.e. Gated DeltaNet;
ungated: g=None, i.e. plain DeltaNet) and each pass (fwd: the forward call on inputs that require grad; fwd+bwd: the
forward then ``o.backward(dO)`` with a random dO), it times these contestants on identical inputs (q and k
L2-normalised, beta = sigmoid, g = logsigmoid):

  triton     ``kernels.delta_rule.gated_delta_rule(..., backend="triton")``: CUDA only, once "triton" is in
             ``AVAILABLE_BACKENDS``
  reference  the same op with ``backend="reference"`` (the chunked pure-PyTorch form)
  fla        flash-linear-attention's ``chunk_gated_delta_rule`` (gated) and ``chunk_delta_rule`` (ungated): CUDA and
             bf16 only (its kernels are Triton GPU kernels and refuse float32), when ``import fla`` works
  sdpa       causal ``scaled_dot_product_attention`` on the same q, k, v: the softmax-attention yardstick (it has no
             decay, so one figure serves both variants)

The ratio column is ours ms / fla ms for the same shape, variant and pass: 1.0 is parity, below 1.0 ours is faster;
the speed goal is triton <= 1.0 in bf16 on an H100. ``--chunk-size`` sets our chunk size (a tiling: the output does
not depend on it; fla's is 64). Writes bench/results/kernels-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import (
    PASSES,
    Run,
    announce,
    finish,
    fmt_gib,
    fmt_ms,
    fmt_ratio,
    grad_step,
    import_failure,
    median_time,
    ms_ratio,
    pick_shapes,
    print_row,
    shape_text,
    shapes_arg,
    shapes_text,
    timed_description,
    timed_row,
)
from kernels.delta_rule import AVAILABLE_BACKENDS, gated_delta_rule

NAME = "kernels"  # the results files' name
SHAPES = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (8, 1024, 8, 64)]  # (B, T, H, D)
CONTESTANTS = ("triton", "reference", "fla", "sdpa")
VARIANTS = ("gated", "ungated")
CHUNK_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        type=shapes_arg("B,T,H,D", "1,8192,96,128;8,1024,8,64"),
        default=None,
        help=f"delta rule: B,T,H,D[;B,T,H,D...] (K = V = D); default {shapes_text(SHAPES)} on CUDA, scaled down on CPU",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=CHUNK_SIZE,
        help=f"delta rule: our chunk size, a tiling (fla's is 64); default {CHUNK_SIZE}",
    )


def load_fla() -> tuple[dict[str, Callable] | None, str]:
    """fla's chunked gated and plain delta rule, or None and the reason they cannot run."""
    reason = import_failure("fla.ops.gated_delta_rule") or import_failure("fla.ops.delta_rule")
    if reason:
        return None, reason
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return {"gated": chunk_gated_delta_rule, "ungated": chunk_delta_rule}, ""


def fla_version() -> str | None:
    for dist in ("flash-linear-attention", "fla-core"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def fla_call(fn: Callable) -> Callable:
    """fla by keyword, in the [B, T, H, D] layout (head_first=False where the signature still has the flag)."""
    try:
        head_first = "head_first" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: leave fla's default, which is [B, T, H, D] in 0.6
        head_first = False
    extra = {"head_first": False} if head_first else {}

    def call(q, k, v, beta, g, scale):
        gate = {} if g is None else {"g": g}
        o, _ = fn(q=q, k=k, v=v, beta=beta, scale=scale, output_final_state=False, **gate, **extra)
        return o

    return call


def make_op(contestant: str, variant: str, fla_ops: dict[str, Callable] | None, chunk_size: int) -> Callable:
    """(q, k, v, beta, g, scale) -> o [B, T, H, D] for one contestant."""
    if contestant in ("triton", "reference"):

        def op(q, k, v, beta, g, scale):
            o, _ = gated_delta_rule(q, k, v, beta, g, scale=scale, chunk_size=chunk_size, backend=contestant)
            return o

    elif contestant == "fla":
        op = fla_call(fla_ops[variant])

    else:  # sdpa: heads-first for torch, back to [B, T, H, D]; scale D^-0.5 is its default

        def op(q, k, v, beta, g, scale):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)

    return op


def seconds(contestant: str, variant: str, pass_: str, shape: tuple, run: Run, fla_ops, chunk_size: int) -> float:
    """Median seconds of one contestant on fresh inputs (seeded: every contestant sees the same ones)."""
    B, T, H, D = shape
    dtype, device = run.dtype, run.device
    torch.manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device)

    q = F.normalize(randn(B, T, H, D), p=2, dim=-1).to(dtype).requires_grad_()
    k = F.normalize(randn(B, T, H, D), p=2, dim=-1).to(dtype).requires_grad_()
    v = randn(B, T, H, D).to(dtype).requires_grad_()
    beta = torch.rand(B, T, H, device=device).sigmoid().to(dtype).requires_grad_()
    g = F.logsigmoid(randn(B, T, H)).to(dtype).requires_grad_() if variant == "gated" else None
    do = randn(B, T, H, D).to(dtype)
    leaves = [x for x in (q, k, v, beta, g) if x is not None]
    op = make_op(contestant, variant, fla_ops, chunk_size)
    scale = D**-0.5
    return median_time(grad_step(lambda: op(q, k, v, beta, g, scale), leaves, do, pass_), run)


def measure(contestant: str, variant: str, pass_: str, shape: tuple, run: Run, fla_ops, chunk_size: int) -> dict:
    """One row; a failure becomes its ``error``."""
    B, T, H, D = shape
    row = {
        "contestant": contestant,
        "variant": None if contestant == "sdpa" else variant,
        "pass": pass_,
        "shape": list(shape),
        "dtype": run.dtype_name,
        "ms_median": None,
        "tokens_per_sec": None,
        "peak_mem_gib": None,
        "ratio_to_fla": None,
        "error": None,
    }
    return timed_row(row, B * T, run, lambda: seconds(contestant, variant, pass_, shape, run, fla_ops, chunk_size))


def contestants(run: Run) -> tuple[list[str], dict[str, str], dict[str, Callable] | None]:
    """Who runs, why the others do not, and fla's ops where fla runs."""
    skipped, fla_ops = {}, None
    if not run.cuda:
        skipped["triton"] = "no CUDA device"
    elif "triton" not in AVAILABLE_BACKENDS:
        skipped["triton"] = f"no Triton backend (AVAILABLE_BACKENDS = {AVAILABLE_BACKENDS})"
    if not run.cuda:
        skipped["fla"] = "no CUDA device (its kernels are Triton GPU kernels)"
    elif run.dtype != torch.bfloat16:
        skipped["fla"] = f"fla runs in bf16 only here, not {run.dtype_name}"
    else:
        fla_ops, reason = load_fla()
        if fla_ops is None:
            skipped["fla"] = reason
    return [c for c in CONTESTANTS if c not in skipped], skipped, fla_ops


def bench(args: argparse.Namespace, run: Run) -> None:
    shapes, shapes_source = pick_shapes(args.shapes, SHAPES, run, "--shapes")
    chunk_size = args.chunk_size
    running, skipped, fla_ops = contestants(run)
    announce("delta rule", skipped, f"shapes ({shapes_source})", shapes)

    rows: list[dict] = []
    cells: dict[tuple, dict] = {}  # (shape, variant, pass, contestant) -> row; sdpa under both variants
    for shape in shapes:
        for variant in VARIANTS:
            for pass_ in PASSES:
                for contestant in running:
                    if contestant == "sdpa" and variant != VARIANTS[0]:
                        cells[(shape, variant, pass_, contestant)] = cells[(shape, VARIANTS[0], pass_, contestant)]
                        continue
                    row = measure(contestant, variant, pass_, shape, run, fla_ops, chunk_size)
                    rows.append(row)
                    cells[(shape, variant, pass_, contestant)] = row
                    print_row(f"{shape_text(shape):>15} {row['variant'] or '-':>7} {pass_:>7} {contestant:>9}", row)
                # ours/fla for both of ours: the Triton kernel is the one held to the goal.
                fla = cells.get((shape, variant, pass_, "fla"))
                for ours in ("triton", "reference"):
                    row = cells.get((shape, variant, pass_, ours))
                    if row is not None:
                        row["ratio_to_fla"] = ms_ratio(row, fla)

    lines = [
        "| B x T x H x D | variant | pass | ours triton ms | reference ms | fla ms | sdpa ms | ratio ours/fla | "
        "peak GiB (triton / reference / fla / sdpa) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for variant in VARIANTS:
            for pass_ in PASSES:
                got = {c: cells.get((shape, variant, pass_, c)) for c in CONTESTANTS}
                ratio = got["triton"]["ratio_to_fla"] if got["triton"] else None
                lines.append(
                    f"| {shape_text(shape)} | {variant} | {pass_} | "
                    + " | ".join(fmt_ms(got[c]) for c in CONTESTANTS)
                    + f" | {fmt_ratio(ratio)} | "
                    + " / ".join(fmt_gib(got[c]) for c in CONTESTANTS)
                    + " |"
                )

    sentences = [
        f"{run.dtype_name}, K = V = D, our chunk size {chunk_size}; fwd is the forward call on inputs that require "
        "grad, fwd+bwd adds o.backward(dO).",
        "ratio ours/fla = triton ms / fla ms: <= 1.0 means ours is at least as fast (the goal: bf16 on an H100).",
        "sdpa is causal softmax attention on the same q, k, v (no decay: one figure for both variants).",
    ]
    meta = {
        "shapes": [list(s) for s in shapes],
        "default_shapes": [list(s) for s in SHAPES],
        "chunk_size": chunk_size,
        "timed": timed_description(run, "fwd = forward on inputs requiring grad, fwd+bwd = forward + o.backward(dO)"),
        "available_backends": list(AVAILABLE_BACKENDS),
        "contestants": running,
        "fla_version": fla_version() if fla_ops is not None else None,
        "ratio": "ratio_to_fla = ours ms / fla ms for the same shape, variant and pass; <= 1.0: ours at least as fast",
    }
    finish(NAME, run, meta, rows, lines, sentences, shapes_source, skipped)
