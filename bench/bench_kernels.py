"""Delta-rule and Titans memory kernels against their peers: forward and forward + backward, ms, tokens/s, peak memory.

    python bench/bench_kernels.py [--ops delta_rule,titans_memory] [--shapes "B,T,H,D;..."]
                                  [--memory-shapes "B,T,H,D,depth,chunk;..."] [--dtype bf16|fp16|fp32]
                                  [--repeats N] [--warmup N] [--out DIR]

Delta rule (``--ops delta_rule``). For each shape (B, T, H, D) with K = V = D, each variant (gated: with the log
decay g, i.e. Gated DeltaNet; ungated: g=None, i.e. plain DeltaNet) and each pass (fwd: the forward call on inputs
that require grad; fwd+bwd: the forward then ``o.backward(dO)`` with a random dO), it times these contestants on
identical inputs (q and k L2-normalised, beta = sigmoid, g = logsigmoid):

  triton     ``kernels.delta_rule.gated_delta_rule(..., backend="triton")``: CUDA only, once the Triton backend is in
             ``AVAILABLE_BACKENDS``
  reference  the same op with ``backend="reference"`` (pure PyTorch)
  fla        flash-linear-attention's ``chunk_gated_delta_rule`` (gated) and ``chunk_delta_rule`` (ungated): CUDA and
             bf16 only (fla refuses float32), when ``import fla`` works
  sdpa       causal ``scaled_dot_product_attention`` on the same q, k, v: the softmax-attention yardstick (it has no
             decay, so one figure serves both variants)

The ratio column is triton ms / fla ms for the same shape, variant and pass: 1.0 is parity, below 1.0 ours is
faster; the speed goal is <= 1.0 in bf16 on an H100. Writes bench/results/kernels-<device>.json and .md.

Titans memory (``--ops titans_memory``). For each shape (B, T, H, D, depth, chunk): K = V = D, an MLP memory of
``depth`` layers (d = [D, 4D, ..., 4D, D]; depth 1 is a linear D x D memory), GELU, per-token gradients clipped to
norm 1.0 (the Titans model's default), and each pass (fwd; fwd+bwd: ``y.backward(dy)`` into q, k, v, theta, eta,
alpha and the learnable initial weights), it times:

  triton          ``kernels.titans_memory.titans_memory(..., backend="triton")``: CUDA only, once "triton" is in
                  that op's ``AVAILABLE_BACKENDS``
  reference       the same op with ``backend="reference"`` (the chunkwise PyTorch form)
  titans_pytorch  titans-pytorch's ``NeuralMemory(dim=H*D, heads=H, dim_head=D, chunk_size=chunk)`` with the same
                  memory depth, expansion and gradient clipping, on x [B, T, H*D]: CUDA only, when
                  ``import titans_pytorch`` works (it is not a project dependency)

Our op gets q, k, v in the benchmark dtype and the gates and initial weights in float32 (with bf16, as the Titans
model passes them under autocast); the peer keeps its float32 weights and runs under autocast to the benchmark dtype.
The peer's figure includes work ours does not: its own q, k, v, gate and output projections, RMSNorm, LayerNorm and
residual around the memory MLP. It also does different work per chunk (bench_titans_memory.py's docstring has the
details): ours reads each token from the memory updated through that token with per-token momentum and forgetting,
the peer reads the memory of the previous chunk boundary and pools momentum and forgetting per chunk. The ratios are
speed-ups (above 1.0 the second-named, ours, is faster): reference/triton = reference ms / triton ms, the goal being >= 5 for
the depth-2 memory in bf16 on an H100; peer/triton = titans-pytorch ms / triton ms. Writes
bench/results/kernels_titans_memory-<device>.json and .md.

On CUDA each figure is the median of ``--repeats`` CUDA-event timings after ``--warmup`` calls, and peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls (inputs and gradients included). tokens/s is B * T / median
seconds. Without a GPU only the references run, in fp32, on the default shapes scaled down for a small CPU (T / 16,
H at most 4); ``--shapes`` and ``--memory-shapes`` override the shapes on any device. A contestant that fails or runs
out of memory on one shape is recorded as an error entry and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from common import RESULTS, device_and_label, median_cuda_event_seconds, median_seconds, peak_mem_gib, write_results

from kernels.delta_rule import AVAILABLE_BACKENDS, gated_delta_rule
from kernels.titans_memory import AVAILABLE_BACKENDS as MEMORY_BACKENDS
from kernels.titans_memory import initial_memory_state, titans_memory

OPS = ("delta_rule", "titans_memory")
SHAPES = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (8, 1024, 8, 64)]  # (B, T, H, D)
CPU_T_DIVISOR, CPU_MAX_HEADS = 16, 4  # the default shapes are far too big for a small CPU
CONTESTANTS = ("triton", "reference", "fla", "sdpa")
VARIANTS = ("gated", "ungated")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
CHUNK_SIZE = 64
Shape = tuple[int, int, int, int]

# Titans memory: (B, T, H, D, depth, chunk). The speed goal names the depth-2 memory; the depth-1 and chunk-16 rows
# each vary one setting of the first row.
MEMORY_SHAPES = [(4, 4096, 8, 128, 2, 64), (8, 2048, 8, 128, 2, 64), (4, 4096, 8, 128, 1, 64), (4, 4096, 8, 128, 2, 16)]
MEMORY_CONTESTANTS = ("triton", "reference", "titans_pytorch")
MEMORY_EXPANSION = 4  # hidden width of the MLP memory = 4 D
MAX_GRAD_NORM = 1.0  # the Titans model's memory_max_grad_norm default
THETA_MAX = 0.1  # the Titans model's bound on the inner learning rate
MEMORY_GOAL = 5.0  # reference ms / triton ms for the depth-2 memory, bf16, H100
MemoryShape = tuple[int, int, int, int, int, int]


class Run(NamedTuple):
    """What every measurement of one invocation shares."""

    device: str
    label: str
    dtype: torch.dtype
    repeats: int
    warmup: int
    out: Path

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def parse_int_tuples(text: str, names: str, example: str) -> list[tuple[int, ...]]:
    """``"a,b,c;a,b,c"`` -> [(a, b, c), ...] of positive integers, one field per comma-separated name in ``names``;
    argparse turns the error into a usage message and exit code 2."""
    n = len(names.split(","))
    shapes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        try:
            shape = tuple(int(f.strip()) for f in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) != n or min(shape) <= 0:
            raise argparse.ArgumentTypeError(
                f"malformed shape {part.strip()!r}: each shape is {n} positive integers {names}, shapes separated by "
                f'";", e.g. "{example}"'
            )
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError(f'no shape given: expected {names}[;{names}...], e.g. "{example}"')
    return shapes


def parse_shapes(text: str) -> list[Shape]:
    """Delta-rule shapes: ``"B,T,H,D;B,T,H,D"`` (batch, sequence length, heads, head dim)."""
    return parse_int_tuples(text, "B,T,H,D", "1,8192,96,128;8,1024,8,64")


def parse_memory_shapes(text: str) -> list[MemoryShape]:
    """Titans memory shapes: ``"B,T,H,D,depth,chunk;..."`` (depth: MLP memory layers; chunk: the op's chunk size)."""
    return parse_int_tuples(text, "B,T,H,D,depth,chunk", "4,4096,8,128,2,64;1,64,2,16,1,16")


def parse_ops(text: str) -> list[str]:
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise argparse.ArgumentTypeError(f"unknown ops {unknown}: choose from {', '.join(OPS)}")
    return ops


def scaled_for_cpu(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(B, T / 16, min(H, 4), D, ...): the fields after D (memory depth, chunk) are kept."""
    B, T, H, D, *rest = shape
    return (B, max(1, T // CPU_T_DIVISOR), min(H, CPU_MAX_HEADS), D, *rest)


def pick_shapes(given: list | None, defaults: list, run: Run, flag: str) -> tuple[list, str]:
    """The shapes to time and where they came from (recorded in the results): ``given`` by ``flag``, else the
    defaults, scaled down on a CPU."""
    if given is not None:
        return given, flag
    if run.cuda:
        return list(defaults), "default"
    source = f"default scaled for CPU: T / {CPU_T_DIVISOR}, H at most {CPU_MAX_HEADS}"
    return [scaled_for_cpu(s) for s in defaults], source


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def grad_step(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor, pass_: str):
    """One timed call: clear the leaves' gradients, run ``forward``, and for fwd+bwd backpropagate ``dy``."""

    def step() -> None:
        for x in leaves:
            x.grad = None
        y = forward()
        if pass_ == "fwd+bwd":
            y.backward(dy.to(y.dtype))  # under autocast y may come out in another dtype than dy

    return step


def median_time(step: Callable[[], object], run: Run) -> float:
    """Median seconds of ``step``: CUDA events on a GPU, the wall clock on a CPU."""
    if run.cuda:
        return median_cuda_event_seconds(step, run.repeats, warmup=run.warmup)
    return median_seconds(step, run.repeats, run.device, warmup=run.warmup)


def timed_row(row: dict, tokens: int, run: Run, seconds: Callable[[], float]) -> dict:
    """Fill ``row``'s ms_median, tokens_per_sec (tokens / median seconds) and peak_mem_gib from ``seconds()``; a
    failure (out of memory included) becomes the row's ``error`` instead of ending the run. The row lists these
    fields already (None), so they keep their place in the JSON."""
    try:
        median = seconds()
        row |= {"ms_median": 1000 * median, "tokens_per_sec": tokens / median, "peak_mem_gib": peak_mem_gib(run.device)}
    except Exception as e:  # one broken contestant or shape (out of memory included) must not end the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {first}"[:300]
    # The failed call's tensors are unreachable once the exception is gone: hand their memory back before the next.
    gc.collect()
    if run.cuda:
        torch.cuda.empty_cache()
    return row


def print_row(what: str, row: dict) -> None:
    if row["error"]:
        print(f"{what}: {row['error']}")
    else:
        print(
            f"{what}: {row['ms_median']:10.3f} ms  {row['tokens_per_sec']:>13,.0f} tokens/s  "
            f"{row['peak_mem_gib']:7.2f} GiB"
        )


def fmt_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["error"]:
        return "OOM" if row["error"].startswith("OutOfMemoryError") else "error"
    ms = row["ms_median"]
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_gib(row: dict | None) -> str:
    return "-" if row is None or row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"


def fmt_tokens(row: dict | None) -> str:
    return "-" if row is None or row["tokens_per_sec"] is None else f"{row['tokens_per_sec']:,.0f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def ratio_cell(row: dict | None, key: str) -> str:
    return fmt_ratio(row[key] if row is not None else None)


def ms_ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    """numerator ms / denominator ms when both rows were measured."""
    if numerator is None or denominator is None or numerator["error"] or denominator["error"]:
        return None
    return numerator["ms_median"] / denominator["ms_median"]


def timing_sentence(run: Run) -> str:
    return f"Median of {run.repeats} {'CUDA-event' if run.cuda else 'wall-clock'} timings after {run.warmup} warm-up calls."


def closing_sentences(run: Run, shapes_source: str, skipped: dict[str, str], rows: list[dict]) -> list[str]:
    """The note's last sentences: the shapes, what peak memory means, who did not run and what failed."""
    sentences = [
        f"Shapes: {shapes_source}.",
        "Peak GiB is torch's peak allocation over the timed calls, inputs and gradients included."
        if run.cuda
        else "Peak GiB is the process's running RSS peak.",
    ]
    if skipped:
        sentences.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".")
    errors = sum(1 for r in rows if r["error"])
    if errors:
        sentences.append(f"{errors} measurement(s) failed: see the rows' error field in the JSON.")
    return sentences


def timed_description(run: Run, what: str) -> str:
    timing = "CUDA-event" if run.cuda else "wall-clock"
    return f"median of {run.repeats} {timing} timings after {run.warmup} warm-up calls; {what}"


def finish(name: str, run: Run, meta: dict, rows: list[dict], lines: list[str], note: str) -> None:
    write_results(name, run.label, meta, rows, lines, note, run.out)
    print()
    print("\n".join(lines))
    print()
    print(note)


# ---------------------------------------------------------------------------------------------------- delta rule


def load_fla() -> tuple[dict[str, Callable] | None, str]:
    """fla's chunked gated and plain delta rule, or None and the reason they cannot run."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:  # ImportError, or a broken install (fla imports triton and CUDA bits at import time)
        return None, f"import fla failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return {"gated": chunk_gated_delta_rule, "ungated": chunk_delta_rule}, ""


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


def make_op(contestant: str, variant: str, fla_ops: dict[str, Callable] | None) -> Callable:
    """(q, k, v, beta, g, scale) -> o [B, T, H, D] for one contestant."""
    if contestant in ("triton", "reference"):

        def op(q, k, v, beta, g, scale):
            o, _ = gated_delta_rule(q, k, v, beta, g, scale=scale, chunk_size=CHUNK_SIZE, backend=contestant)
            return o

    elif contestant == "fla":
        op = fla_call(fla_ops[variant])

    else:  # sdpa: heads-first for torch, back to [B, T, H, D]; scale D^-0.5 is its default

        def op(q, k, v, beta, g, scale):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2)

    return op


def time_one(contestant: str, variant: str, pass_: str, shape: Shape, run: Run,
             fla_ops: dict[str, Callable] | None) -> float:  # fmt: skip
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
    op = make_op(contestant, variant, fla_ops)
    scale = D**-0.5
    return median_time(grad_step(lambda: op(q, k, v, beta, g, scale), leaves, do, pass_), run)


def measure(contestant: str, variant: str, pass_: str, shape: Shape, run: Run, fla_ops) -> dict:
    """One delta-rule row; a failure becomes its ``error``."""
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
    return timed_row(row, B * T, run, lambda: time_one(contestant, variant, pass_, shape, run, fla_ops))


def fla_version() -> str | None:
    for dist in ("flash-linear-attention", "fla-core"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def delta_rule_contestants(run: Run) -> tuple[list[str], dict[str, str], dict[str, Callable] | None]:
    """Who runs, why the others do not, and fla's ops where fla runs."""
    if not run.cuda:
        skipped = {"triton": "no CUDA device", "fla": "no CUDA device", "sdpa": "no CUDA device (reference only)"}
        return [c for c in CONTESTANTS if c not in skipped], skipped, None
    skipped, fla_ops = {}, None
    if "triton" not in AVAILABLE_BACKENDS:
        skipped["triton"] = f"no Triton backend yet (AVAILABLE_BACKENDS = {AVAILABLE_BACKENDS})"
    if run.dtype != torch.bfloat16:
        skipped["fla"] = f"fla runs in bf16 only here, not {run.dtype_name}"
    else:
        fla_ops, reason = load_fla()
        if fla_ops is None:
            skipped["fla"] = reason
    return [c for c in CONTESTANTS if c not in skipped], skipped, fla_ops


def announce(op: str, skipped: dict[str, str], label: str, shapes: list) -> None:
    """What an op's run will time: the contestants left out (and why) and the shapes."""
    print(f"== {op}")
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")
    print(f"{label}: " + "  ".join(shape_text(s) for s in shapes))


def bench_delta_rule(given_shapes: list[Shape] | None, run: Run) -> None:
    shapes, shapes_source = pick_shapes(given_shapes, SHAPES, run, "--shapes")
    contestants, skipped, fla_ops = delta_rule_contestants(run)
    announce("delta rule", skipped, f"shapes ({shapes_source})", shapes)

    rows: list[dict] = []
    cells: dict[tuple, dict] = {}  # (shape, variant, pass, contestant) -> row; sdpa under both variants
    for shape in shapes:
        for variant in VARIANTS:
            for pass_ in PASSES:
                for contestant in contestants:
                    if contestant == "sdpa" and variant != VARIANTS[0]:
                        cells[(shape, variant, pass_, contestant)] = cells[(shape, VARIANTS[0], pass_, contestant)]
                        continue
                    row = measure(contestant, variant, pass_, shape, run, fla_ops)
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
        f"{run.dtype_name}, K = V = D, chunk size {CHUNK_SIZE}; fwd is the forward call on inputs that require grad, "
        "fwd+bwd adds o.backward(dO).",
        timing_sentence(run),
        "ratio ours/fla = triton ms / fla ms: <= 1.0 means ours is at least as fast (the goal: bf16 on an H100).",
        "sdpa is causal softmax attention on the same q, k, v (no decay: one figure for both variants).",
        *closing_sentences(run, shapes_source, skipped, rows),
    ]
    meta = {
        "threads": torch.get_num_threads(),
        "dtype": run.dtype_name,
        "shapes": [list(s) for s in shapes],
        "shapes_source": shapes_source,
        "default_shapes": [list(s) for s in SHAPES],
        "chunk_size": CHUNK_SIZE,
        "timed": timed_description(run, "fwd = forward on inputs requiring grad, fwd+bwd = forward + o.backward(dO)"),
        "available_backends": list(AVAILABLE_BACKENDS),
        "contestants": contestants,
        "skipped": skipped,
        "fla_version": fla_version() if fla_ops is not None else None,
        "ratio": "ratio_to_fla = ours ms / fla ms for the same shape, variant and pass; <= 1.0: ours at least as fast",
        "errors": sum(1 for r in rows if r["error"]),
    }
    finish("kernels", run, meta, rows, lines, " ".join(sentences))


# ------------------------------------------------------------------------------------------------- Titans memory


def memory_dims(D: int, depth: int) -> list[int]:
    """Layer widths of the MLP memory: D, then 4 D between layers, then D (depth 1: a D x D linear memory)."""
    return [D] + [MEMORY_EXPANSION * D] * (depth - 1) + [D]


def memory_label(depth: int) -> str:
    return f"depth {depth}, x{MEMORY_EXPANSION}" if depth > 1 else "depth 1 (linear)"


def ours_memory_step(backend: str, pass_: str, shape: MemoryShape, run: Run) -> Callable[[], None]:
    """A call of our op on seeded inputs: q, k, v in the benchmark dtype, gates and the learnable initial weights
    [H, d_in, d_out] in its promotion with float32 (what the Titans model passes under autocast)."""
    B, T, H, D, depth, chunk = shape
    dtype, device = run.dtype, run.device
    acc = torch.promote_types(dtype, torch.float32)
    torch.manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device)

    def rand(*size: int) -> torch.Tensor:
        return torch.rand(*size, device=device)

    q = F.normalize(randn(B, T, H, D), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(randn(B, T, H, D), dim=-1).to(dtype).requires_grad_()
    v = randn(B, T, H, D).to(dtype).requires_grad_()
    theta = (THETA_MAX * rand(B, T, H)).to(acc).requires_grad_()
    eta, alpha = (rand(B, T, H).to(acc).requires_grad_() for _ in range(2))
    dims = memory_dims(D, depth)
    init = tuple(  # variance-preserving, as the model initialises them
        (randn(H, d_in, d_out) / d_in**0.5).to(acc).requires_grad_() for d_in, d_out in zip(dims[:-1], dims[1:])
    )
    dy = randn(B, T, H, D).to(dtype)

    def forward() -> torch.Tensor:
        state = initial_memory_state(init, B)  # part of the timed call: its expand and zeros are the model's too
        y, _ = titans_memory(q, k, v, theta, eta, alpha, state, chunk_size=chunk, activation="gelu",
                             max_grad_norm=MAX_GRAD_NORM, backend=backend)  # fmt: skip
        return y

    return grad_step(forward, [q, k, v, theta, eta, alpha, *init], dy, pass_)


def peer_memory_step(pass_: str, shape: MemoryShape, run: Run) -> Callable[[], None]:
    """A call of titans-pytorch's NeuralMemory at the same heads, head dim, memory and chunk size on x [B, T, H*D]
    (float32, as its weights; the matmuls run in the benchmark dtype under autocast)."""
    from titans_pytorch import NeuralMemory

    B, T, H, D, depth, chunk = shape
    torch.manual_seed(0)
    model = NeuralMemory(
        dim=H * D, heads=H, dim_head=D, chunk_size=chunk, max_grad_norm=MAX_GRAD_NORM,
        default_model_kwargs={"depth": depth, "expansion_factor": float(MEMORY_EXPANSION)},
    ).to(run.device)  # fmt: skip
    x = torch.randn(B, T, H * D, device=run.device, requires_grad=True)
    dy = torch.randn(B, T, H * D, device=run.device)
    mixed = run.dtype != torch.float32

    def forward() -> torch.Tensor:
        with torch.autocast(run.device, dtype=run.dtype, enabled=mixed):
            y, _state = model(x)
        return y

    return grad_step(forward, [x, *model.parameters()], dy, pass_)


def measure_memory(contestant: str, pass_: str, shape: MemoryShape, run: Run) -> dict:
    """One Titans memory row; a failure becomes its ``error``."""
    B, T, H, D, depth, chunk = shape

    def seconds() -> float:
        if contestant == "titans_pytorch":
            return median_time(peer_memory_step(pass_, shape, run), run)
        return median_time(ours_memory_step(contestant, pass_, shape, run), run)

    row = {
        "contestant": contestant,
        "pass": pass_,
        "shape": [B, T, H, D],
        "depth": depth,
        "chunk_size": chunk,
        "memory_dims": memory_dims(D, depth),
        "dtype": run.dtype_name,
        "ms_median": None,
        "tokens_per_sec": None,
        "peak_mem_gib": None,
        "speedup_over_reference": None,
        "speedup_over_peer": None,
        "error": None,
    }
    return timed_row(row, B * T, run, seconds)


def peer_version() -> tuple[str | None, str]:
    """titans-pytorch's version, or None and the reason it cannot run."""
    try:
        import titans_pytorch  # noqa: F401
    except Exception as e:  # not installed, or a broken install
        return None, f"import titans_pytorch failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        return importlib.metadata.version("titans-pytorch"), ""
    except importlib.metadata.PackageNotFoundError:  # importable from a path rather than installed
        return "(version unknown)", ""


def memory_contestants(run: Run) -> tuple[list[str], dict[str, str], str | None]:
    """Who runs, why the others do not, and titans-pytorch's version where it runs."""
    if not run.cuda:
        skipped = {"triton": "no CUDA device", "titans_pytorch": "no CUDA device (reference only)"}
        return [c for c in MEMORY_CONTESTANTS if c not in skipped], skipped, None
    skipped = {}
    if "triton" not in MEMORY_BACKENDS:
        skipped["triton"] = f"no Triton backend yet (AVAILABLE_BACKENDS = {MEMORY_BACKENDS})"
    version, reason = peer_version()
    if version is None:
        skipped["titans_pytorch"] = reason
    return [c for c in MEMORY_CONTESTANTS if c not in skipped], skipped, version


def memory_goal_sentence(rows: list[dict], run: Run) -> str:
    """How the depth-2 rows stand against the goal reference/triton >= 5 (stated for bf16 on an H100)."""
    goal = f"Goal: reference/triton >= {MEMORY_GOAL:g} for the depth-2 memory in bf16 on an H100"
    ratios = [
        r["speedup_over_reference"]
        for r in rows
        if r["contestant"] == "triton" and r["depth"] == 2 and r["speedup_over_reference"] is not None
    ]
    if not ratios:
        return f"{goal}: not measured in this run (no triton and reference pair at depth 2)."
    met = sum(r >= MEMORY_GOAL for r in ratios)
    return f"{goal}: {run.dtype_name} on {run.label}, met in {met} of {len(ratios)} depth-2 rows (lowest {min(ratios):.2f})."


def bench_titans_memory(given_shapes: list[MemoryShape] | None, run: Run) -> None:
    shapes, shapes_source = pick_shapes(given_shapes, MEMORY_SHAPES, run, "--memory-shapes")
    contestants, skipped, peer = memory_contestants(run)
    announce("Titans memory", skipped, f"shapes B,T,H,D,depth,chunk ({shapes_source})", shapes)

    rows: list[dict] = []
    cells: dict[tuple, dict] = {}  # (shape, pass, contestant) -> row
    for shape in shapes:
        for pass_ in PASSES:
            for contestant in contestants:
                row = measure_memory(contestant, pass_, shape, run)
                rows.append(row)
                cells[(shape, pass_, contestant)] = row
                print_row(f"{shape_text(shape):>21} {pass_:>7} {contestant:>14}", row)
            # Speed-ups of ours: the Triton kernel over the reference (the goal) and each of ours over the peer.
            triton, reference, peer_row = (cells.get((shape, pass_, c)) for c in MEMORY_CONTESTANTS)
            if triton is not None:
                triton["speedup_over_reference"] = ms_ratio(reference, triton)
            for ours in (triton, reference):
                if ours is not None:
                    ours["speedup_over_peer"] = ms_ratio(peer_row, ours)

    lines = [
        "| B x T x H x D | memory | chunk | pass | triton ms | reference ms | titans-pytorch ms | reference/triton | "
        "peer/triton | peer/reference | tokens/s (triton / reference / peer) | peak GiB (triton / reference / peer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for pass_ in PASSES:
            got = [cells.get((shape, pass_, c)) for c in MEMORY_CONTESTANTS]
            triton, reference = got[0], got[1]
            lines.append(
                f"| {shape_text(shape[:4])} | {memory_label(shape[4])} | {shape[5]} | {pass_} | "
                + " | ".join(fmt_ms(r) for r in got)
                + f" | {ratio_cell(triton, 'speedup_over_reference')} | {ratio_cell(triton, 'speedup_over_peer')}"
                + f" | {ratio_cell(reference, 'speedup_over_peer')} | "
                + " / ".join(fmt_tokens(r) for r in got)
                + " | "
                + " / ".join(fmt_gib(r) for r in got)
                + " |"
            )

    acc = str(torch.promote_types(run.dtype, torch.float32)).removeprefix("torch.")
    goal = memory_goal_sentence(rows, run)
    sentences = [
        f"Titans memory op: K = V = D, MLP memory d = [D, {MEMORY_EXPANSION}D, ..., D] of the given depth, GELU, "
        f"max_grad_norm {MAX_GRAD_NORM:g}; q, k, v in {run.dtype_name}, gates and initial weights in {acc}. fwd is "
        "the forward call on inputs that require grad, fwd+bwd adds y.backward(dy) (into q, k, v, the gates and the "
        "initial weights).",
        timing_sentence(run),
        "Ratios are speed-ups: reference/triton = reference ms / triton ms; peer/triton and peer/reference = "
        "titans-pytorch ms / ours ms (above 1.0 ours is faster).",
        goal,
    ]
    if peer:
        sentences.append(
            f"titans-pytorch {peer} is NeuralMemory(dim=H*D, heads=H, dim_head=D) at the same chunk size, depth and "
            "clipping on x [B, T, H*D], float32 weights under autocast: its figure includes its own projections, "
            "norms and residual, and it reads each chunk from the memory at the chunk's start with momentum and "
            "forgetting pooled per chunk (ours: per token), so its work is not ours."
        )
    sentences += closing_sentences(run, shapes_source, skipped, rows)
    meta = {
        "threads": torch.get_num_threads(),
        "dtype": run.dtype_name,
        "gates_and_weights_dtype": acc,
        "shapes": [list(s) for s in shapes],
        "shape_fields": "B, T, H, D, depth, chunk",
        "shapes_source": shapes_source,
        "default_shapes": [list(s) for s in MEMORY_SHAPES],
        "expansion": MEMORY_EXPANSION,
        "activation": "gelu",
        "max_grad_norm": MAX_GRAD_NORM,
        "timed": timed_description(
            run, "fwd = forward on inputs requiring grad, fwd+bwd = forward + y.backward(dy) into every input"
        ),
        "available_backends": list(MEMORY_BACKENDS),
        "contestants": contestants,
        "skipped": skipped,
        "titans_pytorch_version": peer,
        "peer_setup": f"NeuralMemory(dim=H*D, heads=H, dim_head=D, chunk_size=chunk, max_grad_norm={MAX_GRAD_NORM}, "
        f"default_model_kwargs={{'depth': depth, 'expansion_factor': {float(MEMORY_EXPANSION)}}}) on x [B, T, H*D], "
        "float32 weights, under autocast to the dtype unless float32",
        "ratio": "speedup_over_reference = reference ms / triton ms (goal >= 5 at depth 2, bf16, H100); "
        "speedup_over_peer = titans-pytorch ms / ours ms",
        "goal": goal,
        "errors": sum(1 for r in rows if r["error"]),
    }
    finish("kernels_titans_memory", run, meta, rows, lines, " ".join(sentences))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Delta rule: ratio ours/fla = triton ms / fla ms, <= 1.0 means ours is at least as fast. Titans "
        "memory: reference/triton = reference ms / triton ms, the goal >= 5 at depth 2 (both in bf16 on an H100). "
        "Without a GPU only the PyTorch references run, on shapes scaled down "
        f"(T / {CPU_T_DIVISOR}, H <= {CPU_MAX_HEADS}).",
    )
    parser.add_argument("--ops", type=parse_ops, default=list(OPS), help=f"comma-separated; default {','.join(OPS)}")
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help="delta rule: B,T,H,D[;B,T,H,D...] (K = V = D); default: " + ";".join(",".join(map(str, s)) for s in SHAPES)
        + f" on CUDA, the same with T / {CPU_T_DIVISOR} and H <= {CPU_MAX_HEADS} on CPU",
    )  # fmt: skip
    parser.add_argument(
        "--memory-shapes",
        type=parse_memory_shapes,
        default=None,
        help="Titans memory: B,T,H,D,depth,chunk[;...] (K = V = D); default: "
        + ";".join(",".join(map(str, s)) for s in MEMORY_SHAPES) + " on CUDA, scaled like --shapes on CPU",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure; 10 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before them; default 2")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device, label = device_and_label()
    cuda = device == "cuda"
    run = Run(
        device=device,
        label=label,
        dtype=DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32),
        repeats=args.repeats if args.repeats is not None else (10 if cuda else 5),
        warmup=args.warmup if args.warmup is not None else 2,
        out=args.out,
    )
    if run.repeats < 1 or run.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    if not cuda:
        print("no CUDA device: timing the PyTorch references only (Triton and the peers need a GPU)")
    print(f"dtype {run.dtype_name}, {run.repeats} timed calls after {run.warmup} warm-up per figure")
    if "delta_rule" in args.ops:
        bench_delta_rule(args.shapes, run)
    if "titans_memory" in args.ops:
        bench_titans_memory(args.memory_shapes, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
