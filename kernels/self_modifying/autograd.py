"""The Triton backend of ``self_modifying_titans``: the main memory's chunk loop on the Titans memory kernels.

HOPE's main memory is a Titans memory with three differences (README, "The Triton backend"), all of which the kernels
in ``kernels/titans_memory`` take as switches or as host-side coefficients:

- it is residual and regresses its own read of v: the MLP's target is ``v + MLP(v) - k`` at the chunk-start weights
  (``RESIDUAL``; the outer gradient flows through the target into v, k and the weights);
- exact Delta Gradient Descent (``DGD``): every token's update keeps the gradient's left factor, the layer input a at
  the chunk start, and its right factor solves the chunk's unit lower-triangular system against the chunk-start
  state, with the read's coefficients (README, "Exact DGD"); the clip applies to the gradient term only;
- each token reads the memory before its own write: the read's coefficients are the previous row's
  (``chunk_coefficients(..., read_before_write=True)``), and the read is residual, ``o = q + MLP(q)``; the same rows
  are the coefficients of the state each token's DGD term meets.

Retention alpha, the learning rate eta and the per-head momentum decay beta map to the kernels' keep, theta and eta.
The generators (their chunk's gates come from their own read of that chunk) stay in PyTorch.
"""

from __future__ import annotations

import torch

from kernels.titans_memory.autograd import (
    TitansMemoryFunction,
    chunk_coefficients,
    tile_edge,
    unverified,  # noqa: F401 (the same kernels, the same GPU record)
)
from kernels.titans_memory.autograd import unsupported as _unsupported


def unsupported(x: torch.Tensor, depth: int, memory_chunk_size: int) -> str | None:
    """Why the kernels cannot run this op's main memory, or None when they can. The op computes in the promotion of
    x's dtype and float32, so the kernels see float32 (or float64) tensors, and multiply their tiles as x's dtype
    would (``triton_main_memory``'s ``dot_dtype``)."""
    K = x.shape[-1]
    return _unsupported(x.dtype, K, K, depth, memory_chunk_size)


@torch.compiler.disable
def triton_main_memory(
    q, k, v, eta, alpha, beta, main_w, main_s, *, chunk_size, dgd, activation, max_grad_norm, dot_dtype=None
):
    """``reference._main_memory`` on the kernels: inputs [B, H, T, .] (heads first), state [B, 1, H, d_in, d_out]
    per layer. Returns (o [B, H, T, K], final weights, final momentum) in the same layouts. ``dot_dtype``: the
    dtype whose tile products the kernels use (the op's x dtype: bf16 or fp16 models get tensor-core products of the
    float32 tiles, as the Titans op does for its bf16 inputs; None: float32 products)."""
    B, H, T, _ = q.shape
    coefs = chunk_coefficients(
        eta.transpose(1, 2),
        beta.expand(B, T, H),
        alpha.transpose(1, 2),
        chunk_size,
        tile_edge(chunk_size),
        read_before_write=True,
    )
    settings = (chunk_size, activation, max_grad_norm, True, dgd, dot_dtype)
    state = [w[:, 0] for w in main_w] + [s[:, 0] for s in main_s]
    y, *final = TitansMemoryFunction.apply(settings, *(t.transpose(1, 2) for t in (q, k, v)), *coefs, *state)
    L = len(main_w)
    return q + y.transpose(1, 2), [w[:, None] for w in final[:L]], [s[:, None] for s in final[L:]]
