"""Delta-rule kernels vs flash-linear-attention and SDPA: forward and forward + backward, ms, tokens/s, peak memory.

    python bench/bench_kernels.py [--shapes "B,T,H,D;B,T,H,D"] [--dtype bf16|fp16|fp32] [--repeats N] [--warmup N]

For each shape (B, T, H, D) with K = V = D, each variant (gated: with the log decay g, i.e. Gated DeltaNet; ungated:
g=None, i.e. plain DeltaNet) and each pass (fwd: the forward call on inputs that require grad; fwd+bwd: the forward
then ``o.backward(dO)`` with a random dO), it times these contestants on identical inputs (q and k L2-normalised,
beta = sigmoid, g = logsigmoid):

  triton     ``kernels.delta_rule.gated_delta_rule(..., backend="triton")``: CUDA only, once the Triton backend is in
             ``AVAILABLE_BACKENDS``
  reference  the same op with ``backend="reference"`` (pure PyTorch)
  fla        flash-linear-attention's ``chunk_gated_delta_rule`` (gated) and ``chunk_delta_rule`` (ungated): CUDA and
             bf16 only (fla refuses float32), when ``import fla`` works
  sdpa       causal ``scaled_dot_product_attention`` on the same q, k, v: the softmax-attention yardstick (it has no
             decay, so one figure serves both variants)

On CUDA each figure is the median of ``--repeats`` CUDA-event timings after ``--warmup`` calls, and peak memory is
``torch.cuda.max_memory_allocated`` over the timed calls (inputs and gradients included). The ratio column is
triton ms / fla ms for the same shape, variant and pass: 1.0 is parity, below 1.0 ours is faster; the speed goal is
<= 1.0 in bf16 on an H100. tokens/s is B * T / median seconds.

Without a GPU only the reference runs, in fp32, on the default shapes scaled down for a small CPU (T / 16, H at most
4); ``--shapes`` overrides the shapes on any device. A contestant that fails or runs out of memory on one shape is
recorded as an error entry and the run goes on. Writes bench/results/kernels-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import device_and_label, median_cuda_event_seconds, median_seconds, peak_mem_gib, write_results

from kernels.delta_rule import AVAILABLE_BACKENDS, gated_delta_rule

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


def parse_shapes(text: str) -> list[Shape]:
    """``"B,T,H,D;B,T,H,D"`` -> [(B, T, H, D), ...]; argparse turns the error into a usage message and exit code 2."""
    shapes = []
    for part in text.split(";"):
        if not part.strip():
            continue
        fields = [f.strip() for f in part.split(",")]
        try:
            shape = tuple(int(f) for f in fields)
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) <= 0:
            raise argparse.ArgumentTypeError(
                f"malformed shape {part.strip()!r}: each shape is four positive integers B,T,H,D (batch, sequence "
                'length, heads, head dim), shapes separated by ";", e.g. --shapes "1,8192,96,128;8,1024,8,64"'
            )
        shapes.append(shape)
    if not shapes:
        raise argparse.ArgumentTypeError('no shape given: expected B,T,H,D[;B,T,H,D...], e.g. --shapes "1,64,2,16"')
    return shapes


def scaled_for_cpu(shape: Shape) -> Shape:
    B, T, H, D = shape
    return B, max(1, T // CPU_T_DIVISOR), min(H, CPU_MAX_HEADS), D


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


def time_one(
    contestant: str, variant: str, pass_: str, shape: Shape, *, dtype: torch.dtype, device: str, repeats: int,
    warmup: int, fla_ops: dict[str, Callable] | None,
) -> float:  # fmt: skip
    """Median seconds of one contestant on fresh inputs (seeded: every contestant sees the same ones)."""
    B, T, H, D = shape
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

    def step() -> None:
        for x in leaves:
            x.grad = None
        o = op(q, k, v, beta, g, scale)
        if pass_ == "fwd+bwd":
            o.backward(do)

    if device == "cuda":
        return median_cuda_event_seconds(step, repeats, warmup=warmup)
    return median_seconds(step, repeats, device, warmup=warmup)


def measure(contestant: str, variant: str, pass_: str, shape: Shape, *, device: str, dtype: torch.dtype, **kw) -> dict:
    """One row; a failure (out of memory included) becomes the row's ``error`` instead of ending the run."""
    B, T, H, D = shape
    row = {
        "contestant": contestant,
        "variant": None if contestant == "sdpa" else variant,
        "pass": pass_,
        "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."),
        "ms_median": None,
        "tokens_per_sec": None,
        "peak_mem_gib": None,
        "ratio_to_fla": None,
        "error": None,
    }
    try:
        seconds = time_one(contestant, variant, pass_, shape, device=device, dtype=dtype, **kw)
        row["ms_median"] = 1000 * seconds
        row["tokens_per_sec"] = B * T / seconds
        row["peak_mem_gib"] = peak_mem_gib(device)
    except Exception as e:  # one broken contestant or shape (out of memory included) must not end the run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        row["error"] = f"{type(e).__name__}: {first}"[:300]
    # The failed call's tensors are unreachable once the exception is gone: hand their memory back before the next.
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt_ms(row: dict | None) -> str:
    if row is None:
        return "-"
    if row["error"]:
        return "OOM" if row["error"].startswith("OutOfMemoryError") else "error"
    ms = row["ms_median"]
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_gib(row: dict | None) -> str:
    return "-" if row is None or row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="ratio ours/fla = triton ms / fla ms per shape, variant and pass: <= 1.0 means ours is at least as "
        "fast (the goal, in bf16 on an H100). Without a GPU only the PyTorch reference runs, on shapes scaled down "
        f"(T / {CPU_T_DIVISOR}, H <= {CPU_MAX_HEADS}).",
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help='B,T,H,D[;B,T,H,D...] (K = V = D); default: ' + ";".join(",".join(map(str, s)) for s in SHAPES)
        + f" on CUDA, the same with T / {CPU_T_DIVISOR} and H <= {CPU_MAX_HEADS} on CPU",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per figure; 10 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before them; default 2")
    args = parser.parse_args()
    device, device_name = device_and_label()
    cuda = device == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    repeats = args.repeats if args.repeats is not None else (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else 2
    if repeats < 1 or warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    if args.shapes is not None:
        shapes, shapes_source = args.shapes, "--shapes"
    elif cuda:
        shapes, shapes_source = list(SHAPES), "default"
    else:
        shapes = [scaled_for_cpu(s) for s in SHAPES]
        shapes_source = f"default scaled for CPU: T / {CPU_T_DIVISOR}, H at most {CPU_MAX_HEADS}"

    # Who runs, and why the others do not.
    skipped: dict[str, str] = {}
    fla_ops, fla_version = None, None
    if not cuda:
        print("no CUDA device: timing the PyTorch reference only (Triton and fla need a GPU)")
        skipped = {"triton": "no CUDA device", "fla": "no CUDA device", "sdpa": "no CUDA device (reference only)"}
    else:
        if "triton" not in AVAILABLE_BACKENDS:
            skipped["triton"] = f"no Triton backend yet (AVAILABLE_BACKENDS = {AVAILABLE_BACKENDS})"
        if dtype != torch.bfloat16:
            skipped["fla"] = f"fla runs in bf16 only here, not {str(dtype).removeprefix('torch.')}"
        else:
            fla_ops, reason = load_fla()
            if fla_ops is None:
                skipped["fla"] = reason
            else:
                for dist in ("flash-linear-attention", "fla-core"):
                    try:
                        fla_version = importlib.metadata.version(dist)
                        break
                    except importlib.metadata.PackageNotFoundError:
                        pass
    contestants = [c for c in CONTESTANTS if c not in skipped]
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}")
    print(f"shapes ({shapes_source}): " + "  ".join("x".join(map(str, s)) for s in shapes))
    print(f"dtype {str(dtype).removeprefix('torch.')}, {repeats} timed calls after {warmup} warm-up per figure")

    rows: list[dict] = []
    cells: dict[tuple, dict] = {}  # (shape, variant, pass, contestant) -> row; sdpa under both variants
    for shape in shapes:
        for variant in VARIANTS:
            for pass_ in PASSES:
                for contestant in contestants:
                    if contestant == "sdpa" and variant != VARIANTS[0]:
                        cells[(shape, variant, pass_, contestant)] = cells[(shape, VARIANTS[0], pass_, contestant)]
                        continue
                    row = measure(
                        contestant, variant, pass_, shape, device=device, dtype=dtype, repeats=repeats,
                        warmup=warmup, fla_ops=fla_ops,
                    )  # fmt: skip
                    rows.append(row)
                    cells[(shape, variant, pass_, contestant)] = row
                    what = f"{'x'.join(map(str, shape)):>15} {row['variant'] or '-':>7} {pass_:>7} {contestant:>9}"
                    if row["error"]:
                        print(f"{what}: {row['error']}")
                    else:
                        print(
                            f"{what}: {row['ms_median']:10.3f} ms  {row['tokens_per_sec']:>13,.0f} tokens/s  "
                            f"{row['peak_mem_gib']:7.2f} GiB"
                        )
                # ours/fla for both of ours: the Triton kernel is the one held to the goal.
                fla = cells.get((shape, variant, pass_, "fla"))
                for ours in ("triton", "reference"):
                    row = cells.get((shape, variant, pass_, ours))
                    if row is None:
                        continue
                    ok = fla is not None and not fla["error"] and not row["error"]
                    if ok:
                        row["ratio_to_fla"] = row["ms_median"] / fla["ms_median"]

    lines = [
        "| B x T x H x D | variant | pass | ours triton ms | reference ms | fla ms | sdpa ms | ratio ours/fla | "
        "peak GiB (triton / reference / fla / sdpa) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for variant in VARIANTS:
            for pass_ in PASSES:
                got = {c: cells.get((shape, variant, pass_, c)) for c in CONTESTANTS}
                triton = got["triton"]
                ratio = triton["ratio_to_fla"] if triton else None
                lines.append(
                    f"| {'x'.join(map(str, shape))} | {variant} | {pass_} | "
                    + " | ".join(fmt_ms(got[c]) for c in CONTESTANTS)
                    + f" | {f'{ratio:.2f}' if ratio is not None else '-'} | "
                    + " / ".join(fmt_gib(got[c]) for c in CONTESTANTS)
                    + " |"
                )

    errors = [r for r in rows if r["error"]]
    dtype_name = str(dtype).removeprefix("torch.")
    timing = "CUDA-event" if cuda else "wall-clock"
    sentences = [
        f"{dtype_name}, K = V = D, chunk size {CHUNK_SIZE}; fwd is the forward call on inputs that require grad, "
        "fwd+bwd adds o.backward(dO).",
        f"Median of {repeats} {timing} timings after {warmup} warm-up calls.",
        "ratio ours/fla = triton ms / fla ms: <= 1.0 means ours is at least as fast (the goal: bf16 on an H100).",
        "sdpa is causal softmax attention on the same q, k, v (no decay: one figure for both variants).",
        f"Shapes: {shapes_source}.",
        "Peak GiB is torch's peak allocation over the timed calls, inputs and gradients included."
        if cuda
        else "Peak GiB is the process's running RSS peak.",
    ]
    if skipped:
        sentences.append("Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()) + ".")
    if errors:
        sentences.append(f"{len(errors)} measurement(s) failed: see the rows' error field in the JSON.")
    note = " ".join(sentences)
    meta = {
        "threads": torch.get_num_threads(),
        "dtype": dtype_name,
        "shapes": [list(s) for s in shapes],
        "shapes_source": shapes_source,
        "default_shapes": [list(s) for s in SHAPES],
        "chunk_size": CHUNK_SIZE,
        "timed": (
            f"median of {repeats} {timing} timings after {warmup} warm-up calls; "
            "fwd = forward on inputs requiring grad, fwd+bwd = forward + o.backward(dO)"
        ),
        "available_backends": list(AVAILABLE_BACKENDS),
        "contestants": contestants,
        "skipped": skipped,
        "fla_version": fla_version,
        "ratio": "ratio_to_fla = ours ms / fla ms for the same shape, variant and pass; <= 1.0: ours at least as fast",
        "errors": len(errors),
    }
    write_results("kernels", device_name, meta, rows, lines, note)
    print()
    print("\n".join(lines))
    print()
    print(note)


if __name__ == "__main__":
    main()
