"""The Triton backend of ``gated_delta_rule``: host functions that launch the kernels, joined by one autograd Function.

Forward: UT transform per chunk (wy_fast) -> state pass across chunks (chunk_h) -> read-out per chunk (chunk_o).
Backward recomputes the forward's intermediates (w, u, T, the chunk states and v_new) from the saved inputs instead
of keeping them: the chunk states alone are K*V per chunk, more than the chunk's q, k and v together. Then it runs
the state pass backwards (dh, dv_new, dh0), the read-out backward (dq, dk, dw, part of dgamma) and the UT-transform
backward (dv, dbeta, the rest of dk and dgamma, and dg).

Every kernel accumulates in float32; tl.dot operands are in the input dtype (bf16/fp16 tensor cores), and float32
inputs use IEEE products unless torch's float32 matmul precision allows TF32.
"""

from __future__ import annotations

import torch

from kernels.delta_rule.chunk_h import chunk_gated_delta_rule_bwd_dhu, chunk_gated_delta_rule_fwd_h
from kernels.delta_rule.chunk_o import chunk_bwd_dqkwg, chunk_fwd_o
from kernels.delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_fwd

CHUNK_SIZES = (16, 32, 64)  # tl.dot needs tiles of at least 16; above 64 the [BT, BT] tiles cost more than they save
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM_K = 256  # the state pass holds all of K in one register tile


def unsupported(q: torch.Tensor, chunk_size: int) -> str | None:
    """Why the Triton backend cannot run these inputs, or None when it can."""
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size={chunk_size} (the kernels tile chunks of {', '.join(map(str, CHUNK_SIZES))})"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (the kernels take float32, float16 or bfloat16)"
    if q.shape[-1] > MAX_HEAD_DIM_K:
        return f"key head dim {q.shape[-1]} > {MAX_HEAD_DIM_K}"
    return None


def _dot_precision(dtype: torch.dtype) -> str:
    # Only float32 operands care; "highest" is torch's default and means no TF32 in torch's own matmuls either.
    return "ieee" if dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"


def chunk_gated_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size):
    prec = _dot_precision(q.dtype)
    gc, _, w, u = prepare_wy_repr_fwd(k, v, beta, g, chunk_size, prec)
    h, v_new, ht = chunk_gated_delta_rule_fwd_h(k, w, u, gc, initial_state, output_final_state, chunk_size, prec)
    o = chunk_fwd_o(q, k, v_new, h, gc, scale, chunk_size, prec)
    return o, ht


def chunk_gated_delta_rule_bwd(q, k, v, beta, g, scale, initial_state, do, dht, chunk_size):
    prec = _dot_precision(q.dtype)
    gc, A, w, u = prepare_wy_repr_fwd(k, v, beta, g, chunk_size, prec)
    h, v_new, _ = chunk_gated_delta_rule_fwd_h(k, w, u, gc, initial_state, False, chunk_size, prec)
    dh, dv_new, dh0 = chunk_gated_delta_rule_bwd_dhu(
        q, k, w, gc, do, dht, initial_state is not None, scale, chunk_size, prec
    )
    dq, dk, dw, dgc = chunk_bwd_dqkwg(q, k, v_new, h, gc, do, dh, dv_new, scale, chunk_size, prec)
    dv, dbeta, dg = prepare_wy_repr_bwd(k, v, beta, gc, A, dw, dv_new, dk, dgc, chunk_size, prec)
    return dq, dk, dv, dbeta, dg, dh0


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size):
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        g = g.contiguous() if g is not None else None
        initial_state = initial_state.contiguous() if initial_state is not None else None
        o, ht = chunk_gated_delta_rule_fwd(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
        ctx.save_for_backward(q, k, v, beta, g, initial_state)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, g, initial_state = ctx.saved_tensors
        dq, dk, dv, dbeta, dg, dh0 = chunk_gated_delta_rule_bwd(
            q,
            k,
            v,
            beta,
            g,
            ctx.scale,
            initial_state,
            do.contiguous(),
            dht.contiguous() if dht is not None else None,
            ctx.chunk_size,
        )
        return (
            dq.to(q.dtype),
            dk.to(k.dtype),
            dv.to(v.dtype),
            dbeta.to(beta.dtype),
            dg.to(g.dtype) if g is not None else None,
            None,
            dh0.to(initial_state.dtype) if initial_state is not None else None,
            None,
            None,
        )


@torch.compiler.disable
def triton_gated_delta_rule(q, k, v, beta, g, *, scale, initial_state, output_final_state, chunk_size):
    """The Triton backend, with the reference backend's contract (o in v's dtype, final state in float32 or None)."""
    o, ht = ChunkGatedDeltaRuleFunction.apply(q, k, v, beta, g, scale, initial_state, output_final_state, chunk_size)
    return o, ht
