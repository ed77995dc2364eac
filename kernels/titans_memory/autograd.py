"""The Triton backend of ``titans_memory``: the gate coefficients in PyTorch, the chunk loop in Triton, joined by one
autograd Function.

The coefficients of a chunk (README, "The chunkwise form": c = beta, d = D_beta E, Gamma = D_beta D_eta diag(theta),
and the state update's rows g = Gamma[last], h = theta * E_last / E_s, c_end, d_end, e_end) depend only on the gates,
not on the memory, so they are computed for every chunk at once, in PyTorch, and autograd takes their gradients back
to theta, eta and alpha. What depends on the memory, the gradient factors at each chunk's start weights, the read
and the state update, runs in ``chunk_kernels``: one program per (batch, head), chunk after chunk.

The forward keeps chunk-start states (float32) for the backward: all of them for up to KEEP_ALL_CHUNKS chunks, as
the reference's autograd graph does, else those of every segment start. The backward walks the segments and their
chunks in reverse, recomputing a segment's chunk-start states from its checkpoint and each chunk's factors and read
from its start state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton

from kernels.memory_math import segment_products
from kernels.titans_memory.chunk_kernels import titans_memory_bwd_kernel, titans_memory_fwd_kernel
from kernels.titans_memory.reference import MemoryState

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHUNK = 64  # the [C, C] score and coefficient tiles live in registers
MAX_HEAD_DIM = 128  # K and V are one register tile each (the hidden width D is tiled: any D)
# float32 inputs multiply float32 tiles, twice the shared memory of half ones: a [C, K] tile of more than 4096 entries
# (chunk 64 with K or V above 64) takes the backward past an H100's 227 KiB (kernels/tools/build.py measures it)
MAX_FP32_TILE = 4096
# Up to this many chunks the forward keeps every chunk-start state for the backward; beyond it, only those of every
# R-th chunk (R = ceil(sqrt(NC))), and the backward recomputes one segment of R chunks at a time: about 2 sqrt(NC)
# states in memory instead of NC, for one more pass of the state loop (without the read) in the backward.
KEEP_ALL_CHUNKS = 16
DEPTHS = (1, 2)
# Chunks above this stay on the reference under backend="auto": on an H200 (Triton 3.6) the kernels at chunk 64 hit
# an illegal memory access, in a bf16 Titans training step and in the op benchmark's forward + backward (bench/ops/titans_memory.py), while HOPE's
# main memory at chunk 16 trained (bench/results/gpu-check-NVIDIA_H200.md). compute-sanitizer names an out-of-bounds
# *shared*-memory read inside the half-precision dots (PREC "bf16", forward and backward kernels); the same shape with
# float32 tiles (PREC "ieee") runs clean, and the CPU interpreter, which checks every global access against the
# launch's tensors (tests/kernels/bounds.py), finds none. backend="triton" still runs them, for the GPU check
# (bench/gpu_check.sh memcheck tries TF32 and IEEE tiles at chunk 64) that will decide the fix.
AUTO_MAX_CHUNK = 16


def unsupported(dtype: torch.dtype, K: int, V: int, depth: int, chunk_size: int) -> str | None:
    """Why the kernels cannot run a memory of this depth and head dims on inputs of this dtype, or None when they
    can."""
    if depth not in DEPTHS:
        return f"a depth-{depth} memory (the kernels take depths 1 and 2)"
    if chunk_size > MAX_CHUNK:
        return f"chunk_size={chunk_size} (the kernels take chunks of at most {MAX_CHUNK} tokens)"
    if dtype not in DTYPES:
        return f"dtype {dtype} (the kernels take float32, float16 or bfloat16)"
    width = max(K, V)
    if width > MAX_HEAD_DIM:
        return f"head dims K={K}, V={V} (at most {MAX_HEAD_DIM})"
    if dtype == torch.float32 and tile_edge(chunk_size) * tile_edge(width) > MAX_FP32_TILE:
        return (
            f"float32 inputs at chunk_size={chunk_size} with head dim {width} (float32 tiles of more than "
            f"{MAX_FP32_TILE} entries exceed the GPU's shared memory: use bf16 inputs or a chunk of at most "
            f"{MAX_FP32_TILE // tile_edge(width)})"
        )
    return None


def unverified(chunk_size: int) -> str | None:
    """Why backend="auto" keeps a chunk size the kernels take on the reference (None: it does not)."""
    if chunk_size <= AUTO_MAX_CHUNK:
        return None
    return f"chunk_size={chunk_size} (above {AUTO_MAX_CHUNK}, the kernels' bf16 dots read shared memory out of bounds on an H200)"


def tile_edge(n: int) -> int:
    """A tile edge: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def chunk_coefficients(theta, eta, keep, chunk_size: int, block: int, read_before_write: bool = False):
    """Per chunk, padded to ``block`` rows: c, d, g, h [B, H, NC, block], Gamma [B, H, NC, block, block] and the
    end coefficients (c_end, d_end, e_end) [B, H, NC, 3], float32 and differentiable, for the recurrence
    S_t = eta_t S_{t-1} - theta_t u_t, W_t = keep_t W_{t-1} + S_t (gates [B, T, H]). Padded tokens have
    keep = eta = 1 and theta = 0, so they add nothing to the rows of real tokens; the end row is the chunk's last real
    token. With ``read_before_write`` the read's rows c, d, Gamma are those of the token before (the chunk start for
    the first token: c = 1, d = 0, Gamma = 0), for a token that reads the memory before its own write (HOPE)."""
    B, T, H = theta.shape
    NC = triton.cdiv(T, chunk_size)

    def chunked(x: torch.Tensor, pad: float) -> torch.Tensor:  # [B, T, H] -> [B, H, NC, block]
        x = F.pad(x.float().transpose(1, 2), (0, NC * chunk_size - T), value=pad)
        return F.pad(x.reshape(B, H, NC, chunk_size), (0, block - chunk_size), value=pad)

    keep, e, th = chunked(keep, 1.0), chunked(eta, 1.0), chunked(theta, 0.0)
    d_beta, d_eta = segment_products(keep), segment_products(e)
    c, big_e = keep.cumprod(-1), e.cumprod(-1)
    d = (d_beta @ big_e[..., None]).squeeze(-1)
    gamma = (d_beta @ d_eta) * th[..., None, :]
    chunks = torch.arange(NC, device=theta.device)
    last = torch.full((NC,), chunk_size - 1, device=theta.device)
    last[-1] = T - 1 - (NC - 1) * chunk_size
    g, h = gamma[:, :, chunks, last], d_eta[:, :, chunks, last] * th
    ends = torch.stack([c[:, :, chunks, last], d[:, :, chunks, last], big_e[:, :, chunks, last]], dim=-1)
    if read_before_write:
        c = F.pad(c[..., :-1], (1, 0), value=1.0)
        d = F.pad(d[..., :-1], (1, 0))
        gamma = F.pad(gamma[..., :-1, :], (0, 0, 1, 0))
    return c, d, g, h, gamma, ends


def _dot_precision(dtype: torch.dtype) -> str:
    """How the kernels multiply their float32 tiles: rounded to the inputs' half type for bf16/fp16 inputs (tensor
    cores, as the delta-rule kernels do), TF32 for float32 inputs only when torch's own matmuls may use it."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


class LaunchShape:
    """Tile sizes of one call: chunk block BC, key/value tiles BK/BV, the last layer's input width D_IN tiled by BD."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, depth: int, hidden: int, chunk_size: int):
        self.B, self.T, self.H, self.K = q.shape
        self.V, self.depth = v.shape[-1], depth
        self.D = hidden if depth == 2 else self.K
        self.D_IN = self.D  # the last layer's input: the hidden layer (depth 2) or the key (depth 1)
        self.C, self.NC = chunk_size, triton.cdiv(self.T, chunk_size)
        self.BC = tile_edge(chunk_size)
        self.BK, self.BV = tile_edge(self.K), tile_edge(self.V)
        self.BD = min(32, tile_edge(self.D_IN))  # 32: the backward's shared memory at chunk 64, K = 128
        self.DP = triton.cdiv(self.D_IN, self.BD) * self.BD

    def settings(
        self,
        activation: str,
        max_grad_norm: float | None,
        dtype: torch.dtype,
        residual: bool = False,
        dgd: bool = False,
    ) -> dict:
        """The kernels' compile-time arguments and launch settings (kernels/tools/build.py builds with these too)."""
        return dict(
            H=self.H,
            K=self.K,
            V=self.V,
            D=self.D,
            D_IN=self.D_IN,
            DP=self.DP,
            C=self.C,
            BC=self.BC,
            BK=self.BK,
            BV=self.BV,
            BD=self.BD,
            DEPTH=self.depth,
            ACT=activation,
            CLIP=max_grad_norm is not None,
            PREC=_dot_precision(dtype),
            RESIDUAL=residual,
            DGD=dgd,
            num_warps=8 if self.BC >= 64 else 4,
            num_stages=1,
        )

    def segment(self) -> int:
        """Chunks per segment: the backward keeps the states of one segment at a time (README, "Memory")."""
        return self.NC if self.NC <= KEEP_ALL_CHUNKS else math.isqrt(self.NC - 1) + 1

    def launch(self, kernel, *args, chunks: range, slots: int, max_grad_norm: float, settings: dict) -> None:
        """One launch over ``chunks``, with per-program state buffers of ``slots`` slots."""
        kernel[(self.B * self.H,)](*args, self.T, self.NC, chunks.start, len(chunks), slots, max_grad_norm, **settings)


def _by_layer(tensors: list, depth: int, dummy: torch.Tensor) -> list:
    """Per-layer tensors (W_1..W_L, S_1..S_L) as the kernels' (W1, S1, W2, S2); depth 1 has no first layer."""
    if depth == 2:
        return [tensors[0], tensors[2], tensors[1], tensors[3]]
    return [dummy, dummy, tensors[0], tensors[1]]


class _Run:
    """One call's shapes, settings and buffers: per layer, weights and momentum at every segment start (the
    checkpoints, [B, H, NS + 1, d_in, d_out]) and at every chunk start of one segment (the working states,
    [B, H, R + 1, d_in, d_out]), all float32."""

    def __init__(self, q, v, layers: list, chunk_size, activation, max_grad_norm, residual, dgd, dot_dtype=None):
        self.L = len(layers) // 2
        self.shape = s = LaunchShape(q, v, self.L, layers[0].shape[-1], chunk_size)
        self.R = s.segment()
        self.segments = [range(n0, min(n0 + self.R, s.NC)) for n0 in range(0, s.NC, self.R)]
        self.settings = s.settings(activation, max_grad_norm, dot_dtype or q.dtype, residual, dgd)
        self.scratch_slots = 6 if dgd else 5  # the backward's per-program [BC, DP] scratch tiles
        self.max_grad_norm = max_grad_norm or 1.0  # a placeholder when clipping is off (CLIP=False)
        self.dummy = q.new_empty(1, dtype=torch.float32)

    def buffers(self, layers: list, slots: int) -> list:
        return [x.new_empty(self.shape.B, self.shape.H, slots, *x.shape[-2:], dtype=torch.float32) for x in layers]

    def states(self, q, k, v, coefs, work, chunks: range, y=None) -> None:
        """Run ``chunks`` from the states in slot 0 of ``work``, writing y too when given."""
        sc = q.new_empty(self.shape.B * self.shape.H * 2 * self.shape.BC * self.shape.DP, dtype=torch.float32)
        args = (q, k, v, *coefs, *_by_layer(work, self.L, self.dummy), self.dummy if y is None else y, sc)
        self.shape.launch(
            titans_memory_fwd_kernel,
            *args,
            chunks=chunks,
            slots=self.R + 1,
            max_grad_norm=self.max_grad_norm,
            settings={**self.settings, "STORE_Y": y is not None},
        )


def titans_memory_fwd(q, k, v, coefs, run: _Run, layers: list):
    """y, and the states at every segment start (slot NS: the final state); with a single segment, the states at
    every chunk start instead (the backward then has nothing to recompute)."""
    y = torch.empty_like(v)
    work = run.buffers(layers, run.R + 1)
    if len(run.segments) == 1:  # the working buffer then holds every chunk-start state: the backward reads it as is
        for w, x in zip(work, layers):
            w[:, :, 0] = x
        run.states(q, k, v, coefs, work, run.segments[0], y)
        return y, work
    checkpoints = run.buffers(layers, len(run.segments) + 1)
    for c, x in zip(checkpoints, layers):
        c[:, :, 0] = x
    for i, chunks in enumerate(run.segments):
        for w, c in zip(work, checkpoints):
            w[:, :, 0] = c[:, :, i]
        run.states(q, k, v, coefs, work, chunks, y)
        for w, c in zip(work, checkpoints):
            c[:, :, i + 1] = w[:, :, len(chunks)]
    return y, checkpoints


def titans_memory_bwd(q, k, v, coefs, run: _Run, saved: list, dy, d_final):
    """Gradients of (q, k, v), of the coefficients, and of the initial weights and momenta (float32). Segment by
    segment from the last: the segment's chunk-start states are recomputed from its checkpoint (unless the forward
    kept them all), then its chunks run backwards."""
    s = run.shape
    # the gradient w.r.t. the state after the last chunk, rewritten chunk by chunk into the one before the first
    grads = []
    for g, x in zip(d_final, saved):
        grad = x.new_zeros(x.shape[:2] + x.shape[3:])
        grads.append(grad.copy_(g) if g is not None else grad)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=torch.float32) for x in (q, k, v))
    dcoefs = [torch.empty_like(x) for x in coefs]
    sc = q.new_empty(s.B * s.H * run.scratch_slots * s.BC * s.DP, dtype=torch.float32)
    recompute = len(run.segments) > 1
    work = run.buffers(saved, run.R + 1) if recompute else saved
    for i in reversed(range(len(run.segments))):
        chunks = run.segments[i]
        if recompute:
            for w, c in zip(work, saved):
                w[:, :, 0] = c[:, :, i]
            run.states(q, k, v, coefs, work, chunks)
        args = (
            q,
            k,
            v,
            *coefs,
            *_by_layer(work, run.L, run.dummy),
            dy,
            *_by_layer(grads, run.L, run.dummy),
            dq,
            dk,
            dv,
            *dcoefs,
            sc,
        )
        s.launch(
            titans_memory_bwd_kernel,
            *args,
            chunks=chunks,
            slots=run.R + 1,
            max_grad_norm=run.max_grad_norm,
            settings=run.settings,
        )
    return dq, dk, dv, dcoefs, grads


class TitansMemoryFunction(torch.autograd.Function):
    """(q, k, v, c, d, g, h, Gamma, ends, W_1..W_L, S_1..S_L) -> (y, W'_1..W'_L, S'_1..S'_L). ``settings`` is
    (chunk_size, activation, max_grad_norm, residual, dgd[, dot_dtype]): residual and dgd select HOPE's main-memory
    rule (a residual memory regressing its own read of v; exact Delta Gradient Descent, whose right factors solve a
    triangular system per chunk against the read's coefficients, so these must be the read-before-write ones);
    dot_dtype (default: q's dtype) picks how the tiles are multiplied (``_dot_precision``)."""

    @staticmethod
    def forward(ctx, settings, q, k, v, *rest):
        coefs, layers = [x.contiguous() for x in rest[:6]], list(rest[6:])
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        run = _Run(q, v, layers, *settings)
        y, saved = titans_memory_fwd(q, k, v, coefs, run, layers)
        ctx.save_for_backward(q, k, v, *coefs, *saved)
        ctx.run = run
        ctx.state_dtypes = [x.dtype for x in layers]
        final = len(run.segments[-1]) if len(run.segments) == 1 else len(run.segments)
        return (y, *(x[:, :, final].clone() for x in saved))

    @staticmethod
    def backward(ctx, dy, *d_final):
        q, k, v, *rest = ctx.saved_tensors
        dq, dk, dv, dcoefs, dstate = titans_memory_bwd(q, k, v, rest[:6], ctx.run, rest[6:], dy.contiguous(), d_final)
        dstate = [g.to(dt) for g, dt in zip(dstate, ctx.state_dtypes)]
        return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dcoefs, *dstate)


@torch.compiler.disable
def triton_titans_memory(q, k, v, theta, eta, alpha, state: MemoryState, *, chunk_size, activation, max_grad_norm):
    """The Triton backend, with the reference backend's contract (y in v's dtype, the state in float32)."""
    coefs = chunk_coefficients(theta, eta, 1 - alpha, chunk_size, tile_edge(chunk_size))
    L = len(state.weights)
    settings = (chunk_size, activation, max_grad_norm, False, False)
    y, *final = TitansMemoryFunction.apply(settings, q, k, v, *coefs, *state.weights, *state.momentum)
    return y, MemoryState(tuple(final[:L]), tuple(final[L:]))
