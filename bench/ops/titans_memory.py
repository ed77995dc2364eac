"""The Titans memory op against titans-pytorch: the op alone (forward, forward + backward) and a memory layer's
training step (forward + backward + AdamW); ms, tokens/s, peak memory.

For each shape (B, T, H, D, depth, chunk): K = V = D, an MLP memory of ``depth`` layers (d = [D, 4D, ..., 4D, D];
depth 1 is a linear D x D memory), GELU, per-token gradients clipped to norm 1.0 (the Titans model's default), and
each pass

  fwd      the op's forward call on inputs that require grad
  fwd+bwd  that call then ``y.backward(dy)`` into q, k, v, theta, eta, alpha and the learnable initial weights
  step     a memory layer's training step on x [B, T, H*D]: zero_grad, forward, mse to a random target, backward,
           AdamW; ours is ``MemoryLayer`` below (the work NeuralMemory does around its memory, on our op)

it times these contestants:

  triton          ``kernels.titans_memory.titans_memory(..., backend="triton")``: CUDA only, once "triton" is in
                  that op's ``AVAILABLE_BACKENDS``
  reference       the same op with ``backend="reference"`` (the chunkwise PyTorch form)
  titans_pytorch  titans-pytorch's ``NeuralMemory(dim=H*D, heads=H, dim_head=D, chunk_size=chunk)`` with the same
                  memory depth, expansion and gradient clipping, on x [B, T, H*D], where ``import titans_pytorch``
                  works (it is not a project dependency; bench/README.md says how to install it beside the project)

In fwd and fwd+bwd our op gets q, k, v in the benchmark dtype and the gates and initial weights in float32 (what the
Titans model passes under autocast), while the peer's figure is its whole module: its own q, k, v, gate and output
projections, RMSNorm, and the LayerNorm + residual around its memory MLP. The step pass sets module against module:
both keep float32 weights and run under autocast to the benchmark dtype (none in float32). The work per chunk still
differs: every token of ours reads the memory updated up to and including itself, with momentum and forgetting per
token, whereas the peer reads the memory as of the previous chunk boundary and pools momentum and forgetting per
chunk, so ours does at least the peer's work and the ratios do not flatter it.

The ratios are speed-ups, above 1.0 ours is faster: reference/triton = reference ms / triton ms (the goal: >= 5 for
the depth-2 memory's fwd and fwd+bwd in bf16 on an H100); peer/triton and peer/reference = titans-pytorch ms / ours
ms (the goal: >= 5 for the step at chunk 16). Writes bench/results/kernels_titans_memory-<device>.json and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import (
    PASSES,
    Run,
    announce,
    finish,
    fmt_gib,
    fmt_ms,
    fmt_tokens,
    goal_sentence,
    grad_step,
    import_failure,
    median_time,
    ms_ratio,
    pick_shapes,
    print_row,
    ratio_cell,
    shape_text,
    shapes_arg,
    shapes_text,
    timed_description,
    timed_row,
)
from kernels.titans_memory import AVAILABLE_BACKENDS, initial_memory_state, titans_memory

NAME = "kernels_titans_memory"  # the results files' name
# (B, T, H, D, depth, chunk). The goals name the depth-2 memory; the depth-1 and chunk-16 rows each vary one setting
# of the first row.
SHAPES = [(4, 4096, 8, 128, 2, 64), (8, 2048, 8, 128, 2, 64), (4, 4096, 8, 128, 1, 64), (4, 4096, 8, 128, 2, 16)]
CONTESTANTS = ("triton", "reference", "titans_pytorch")
PEER = "titans_pytorch"
OUR_PASSES = (*PASSES, "step")
EXPANSION = 4  # hidden width of the MLP memory = 4 D
MAX_GRAD_NORM = 1.0  # the Titans model's memory_max_grad_norm default
THETA_MAX = 0.1  # the Titans model's bound on the inner learning rate
LR = 3e-4  # the step pass's AdamW
KERNEL_GOAL = 5.0  # reference ms / triton ms, depth-2 memory, fwd and fwd+bwd, bf16, H100
PEER_GOAL, PEER_GOAL_CHUNK = 5.0, 16  # titans-pytorch ms / ours ms for the step pass at chunk 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-shapes",
        type=shapes_arg("B,T,H,D,depth,chunk", "4,4096,8,128,2,64;1,64,2,16,1,16"),
        default=None,
        help=f"Titans memory: B,T,H,D,depth,chunk[;...] (K = V = D); default {shapes_text(SHAPES)} on CUDA, "
        "scaled down on CPU (T / 16, H at most 4)",
    )


def memory_dims(D: int, depth: int) -> list[int]:
    """Layer widths of the MLP memory: D, then 4 D between layers, then D (depth 1: a D x D linear memory)."""
    return [D] + [EXPANSION * D] * (depth - 1) + [D]


def memory_label(depth: int) -> str:
    return f"depth {depth}, x{EXPANSION}" if depth > 1 else "depth 1 (linear)"


def initial_weights(H: int, D: int, depth: int, device: str) -> list[torch.Tensor]:
    """[H, d_in, d_out] per layer, variance-preserving, as the Titans model initialises them."""
    dims = memory_dims(D, depth)
    return [torch.randn(H, d_in, d_out, device=device) / d_in**0.5 for d_in, d_out in zip(dims[:-1], dims[1:])]


def call_op(q, k, v, theta, eta, alpha, weights, chunk: int, backend: str) -> torch.Tensor:
    state = initial_memory_state(tuple(weights), q.shape[0])  # timed with the call: the model expands it per batch
    kw = {"chunk_size": chunk, "activation": "gelu", "max_grad_norm": MAX_GRAD_NORM, "backend": backend}
    y, _ = titans_memory(q, k, v, theta, eta, alpha, state, **kw)
    return y


class MemoryLayer(nn.Module):
    """The work NeuralMemory(dim=H*D, heads=H, dim_head=D) does around its memory, on our op: RMSNorm, q, k, v
    projections (q and k L2-normalised), per-token gates theta = 0.1 sigmoid, eta and alpha = sigmoid, learnable
    initial memory weights, an output projection."""

    def __init__(self, H: int, D: int, depth: int, chunk: int, backend: str):
        super().__init__()
        self.H, self.D, self.chunk, self.backend = H, D, chunk, backend
        self.norm = nn.RMSNorm(H * D)
        self.qkv = nn.Linear(H * D, 3 * H * D, bias=False)
        self.gates = nn.Linear(H * D, 3 * H)
        self.init_weights = nn.ParameterList(nn.Parameter(w) for w in initial_weights(H, D, depth, "cpu"))
        self.out = nn.Linear(H * D, H * D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.norm(x)
        qkv = self.qkv(h)
        q, k, v = qkv.view(B, T, 3, self.H, self.D).unbind(2)
        # CUDA autocast computes the norm in float32: keep q and k in the projection's dtype, as the model does
        q, k = (F.normalize(t, dim=-1).to(qkv.dtype) for t in (q, k))
        theta, eta, alpha = torch.sigmoid(self.gates(h).float()).view(B, T, 3, self.H).unbind(2)
        y = call_op(q, k, v, THETA_MAX * theta, eta, alpha, self.init_weights, self.chunk, self.backend)
        return self.out(y.reshape(B, T, -1))


def peer_model(shape: tuple, device: str) -> nn.Module:
    """titans-pytorch's NeuralMemory at the same heads, head dim, memory, clipping and chunk size."""
    from titans_pytorch import NeuralMemory

    _, _, H, D, depth, chunk = shape
    model = NeuralMemory(
        dim=H * D,
        heads=H,
        dim_head=D,
        chunk_size=chunk,
        max_grad_norm=MAX_GRAD_NORM,
        default_model_kwargs={"depth": depth, "expansion_factor": float(EXPANSION)},
    ).to(device)
    # With heads > 1 (0.5.5) its per-head initial weights are one head's repeated as a stride-0 view, which AdamW
    # cannot update in place: give each head its own copy, as per-head learned weights are meant to be.
    for p in model.parameters():
        if 0 in p.stride():
            p.data = p.data.contiguous()
    return model


def autocast(run: Run):
    """Mixed precision for the modules (float32 weights); nothing in float32."""
    if run.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(run.device, dtype=run.dtype)


def op_step(backend: str, pass_: str, shape: tuple, run: Run) -> Callable[[], None]:
    """fwd / fwd+bwd of our op on seeded inputs: q, k, v in the benchmark dtype, gates and the learnable initial
    weights in its promotion with float32."""
    B, T, H, D, depth, chunk = shape
    dtype, device = run.dtype, run.device
    acc = torch.promote_types(dtype, torch.float32)
    q, k = (F.normalize(torch.randn(B, T, H, D, device=device), dim=-1).to(dtype).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, D, device=device).to(dtype).requires_grad_()
    theta = (THETA_MAX * torch.rand(B, T, H, device=device)).to(acc).requires_grad_()
    eta, alpha = (torch.rand(B, T, H, device=device).to(acc).requires_grad_() for _ in range(2))
    weights = [w.to(acc).requires_grad_() for w in initial_weights(H, D, depth, device)]
    dy = torch.randn(B, T, H, D, device=device).to(dtype)

    def forward() -> torch.Tensor:
        return call_op(q, k, v, theta, eta, alpha, weights, chunk, backend)

    return grad_step(forward, [q, k, v, theta, eta, alpha, *weights], dy, pass_)


def module_step(contestant: str, pass_: str, shape: tuple, run: Run) -> Callable[[], None]:
    """A memory layer on x [B, T, H*D]: fwd / fwd+bwd of the peer's module, or the step pass of either side."""
    B, T, H, D, depth, chunk = shape
    if contestant == PEER:
        peer = peer_model(shape, run.device)
        model, forward = peer, lambda x: peer(x)[0]  # NeuralMemory returns (output, state)
    else:
        model = forward = MemoryLayer(H, D, depth, chunk, contestant).to(run.device)
    x = torch.randn(B, T, H * D, device=run.device, requires_grad=pass_ != "step")
    target = torch.randn(B, T, H * D, device=run.device)  # fwd+bwd: the dy
    if pass_ != "step":

        def call() -> torch.Tensor:
            with autocast(run):
                return forward(x)

        return grad_step(call, [x, *model.parameters()], target, pass_)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(run):
            loss = F.mse_loss(forward(x).float(), target)
        loss.backward()
        opt.step()

    return step


def measure(contestant: str, pass_: str, shape: tuple, run: Run) -> dict:
    """One row (seeded: every contestant sees the same inputs); a failure becomes its ``error``."""
    B, T, H, D, depth, chunk = shape

    def seconds() -> float:
        torch.manual_seed(0)
        if contestant == PEER or pass_ == "step":
            return median_time(module_step(contestant, pass_, shape, run), run)
        return median_time(op_step(contestant, pass_, shape, run), run)

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
    reason = import_failure("titans_pytorch")
    if reason:
        return None, reason
    try:
        return importlib.metadata.version("titans-pytorch"), ""
    except importlib.metadata.PackageNotFoundError:  # importable from a path rather than installed
        return "(version unknown)", ""


def contestants(run: Run) -> tuple[list[str], dict[str, str], str | None]:
    """Who runs, why the others do not, and titans-pytorch's version where it runs."""
    skipped = {}
    if not run.cuda:
        skipped["triton"] = "no CUDA device"
    elif "triton" not in AVAILABLE_BACKENDS:
        skipped["triton"] = f"no Triton backend (AVAILABLE_BACKENDS = {AVAILABLE_BACKENDS})"
    version, reason = peer_version()
    if version is None:
        skipped[PEER] = reason
    return [c for c in CONTESTANTS if c not in skipped], skipped, version


def goals(rows: list[dict], run: Run) -> list[str]:
    """How the rows stand against the two goals."""
    kernel = [
        r["speedup_over_reference"]
        for r in rows
        if r["contestant"] == "triton"
        and r["depth"] == 2
        and r["pass"] in PASSES
        and r["speedup_over_reference"] is not None
    ]
    peer = [
        r["speedup_over_peer"]
        for r in rows
        if r["pass"] == "step" and r["chunk_size"] == PEER_GOAL_CHUNK and r["speedup_over_peer"] is not None
    ]
    return [
        goal_sentence(
            f"Goal: reference/triton >= {KERNEL_GOAL:g} for the depth-2 memory's fwd and fwd+bwd in bf16 on an H100",
            kernel,
            KERNEL_GOAL,
            run,
            "depth-2 fwd and fwd+bwd rows",
        ),
        goal_sentence(
            f"Goal: peer/ours >= {PEER_GOAL:g} for the step at chunk {PEER_GOAL_CHUNK}",
            peer,
            PEER_GOAL,
            run,
            f"chunk-{PEER_GOAL_CHUNK} step rows of ours",
        ),
    ]


def bench(args: argparse.Namespace, run: Run) -> None:
    shapes, shapes_source = pick_shapes(args.memory_shapes, SHAPES, run, "--memory-shapes")
    running, skipped, peer = contestants(run)
    announce("Titans memory", skipped, f"shapes B,T,H,D,depth,chunk ({shapes_source})", shapes)

    rows: list[dict] = []
    cells: dict[tuple, dict] = {}  # (shape, pass, contestant) -> row
    for shape in shapes:
        for pass_ in OUR_PASSES:
            for contestant in running:
                row = measure(contestant, pass_, shape, run)
                rows.append(row)
                cells[(shape, pass_, contestant)] = row
                print_row(f"{shape_text(shape):>21} {pass_:>7} {contestant:>14}", row)
            # Speed-ups of ours: the Triton kernel over the reference and each of ours over the peer.
            triton, reference, peer_row = (cells.get((shape, pass_, c)) for c in CONTESTANTS)
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
        for pass_ in OUR_PASSES:
            got = [cells.get((shape, pass_, c)) for c in CONTESTANTS]
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
    goal_lines = goals(rows, run)
    sentences = [
        f"Titans memory op: K = V = D, MLP memory d = [D, {EXPANSION}D, ..., D] of the given depth, GELU, "
        f"max_grad_norm {MAX_GRAD_NORM:g}. fwd is the op's forward call on inputs that require grad (q, k, v in "
        f"{run.dtype_name}, gates and initial weights in {acc}), fwd+bwd adds y.backward(dy); step is a memory "
        f"layer's zero_grad, forward, mse, backward and AdamW on x [B, T, H*D] (ours: RMSNorm, q, k, v, gate and "
        "output projections around the op).",
        "Ratios are speed-ups: reference/triton = reference ms / triton ms; peer/triton and peer/reference = "
        "titans-pytorch ms / ours ms (above 1.0 ours is faster).",
        *goal_lines,
    ]
    if peer:
        sentences.append(
            f"titans-pytorch {peer} is NeuralMemory(dim=H*D, heads=H, dim_head=D) at the same chunk size, depth and "
            "clipping on x [B, T, H*D], float32 weights (under autocast unless float32): in fwd and fwd+bwd its "
            "figure includes its own projections, norms and residual, and it reads each chunk from the memory at the "
            "chunk's start with momentum and forgetting pooled per chunk (ours: per token), so its work is not ours."
        )
    meta = {
        "gates_and_weights_dtype": acc,
        "shapes": [list(s) for s in shapes],
        "shape_fields": "B, T, H, D, depth, chunk",
        "default_shapes": [list(s) for s in SHAPES],
        "expansion": EXPANSION,
        "activation": "gelu",
        "max_grad_norm": MAX_GRAD_NORM,
        "timed": timed_description(
            run,
            "fwd = the op's forward on inputs requiring grad, fwd+bwd = forward + y.backward(dy) into every input, "
            f"step = a memory layer's zero_grad + forward + mse + backward + AdamW (lr {LR:g})",
        ),
        "available_backends": list(AVAILABLE_BACKENDS),
        "contestants": running,
        "titans_pytorch_version": peer,
        "peer_setup": f"NeuralMemory(dim=H*D, heads=H, dim_head=D, chunk_size=chunk, max_grad_norm={MAX_GRAD_NORM}, "
        f"default_model_kwargs={{'depth': depth, 'expansion_factor': {float(EXPANSION)}}}) on x [B, T, H*D], "
        "float32 weights, under autocast to the dtype unless float32",
        "ratio": "speedup_over_reference = reference ms / triton ms; speedup_over_peer = titans-pytorch ms / ours ms",
        "goals": goal_lines,
    }
    finish(NAME, run, meta, rows, lines, sentences, shapes_source, skipped)
