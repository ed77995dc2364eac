"""The Titans neural long-term memory: a deep MLP memory trained online, token by token, by gradient descent with
momentum and forgetting (Titans §3.1, Eq. 13-15), in its chunkwise-parallel form.

``titans_memory`` is the public op; ``reference`` holds the token-by-token rule with autograd gradients (the ground
truth) and the chunkwise form it runs. The math is in README.md beside this file.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels._checks import check_chunk_size, check_one_device, check_per_token, check_qkv
from kernels._dispatch import resolve_backend, takes_inputs
from kernels.memory_math import ACTIVATIONS
from kernels.titans_memory.reference import (
    MemoryState,
    chunk_titans_memory,
    initial_memory_state,
    memory_read,
    recurrent_titans_memory,
)

__all__ = [
    "ACTIVATIONS",
    "MemoryState",
    "chunk_titans_memory",
    "initial_memory_state",
    "memory_read",
    "recurrent_titans_memory",
    "titans_memory",
]

# The Triton kernels (autograd.py and chunk_kernels.py) load on first use, so that CPU runs never import triton.
AVAILABLE_BACKENDS = ("reference", "triton") if importlib.util.find_spec("triton") else ("reference",)


def _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size, activation, max_grad_norm) -> None:
    name = "titans_memory"
    B, T, H, K = check_qkv(name, q, k, v)
    check_per_token(name, (B, T, H), theta=theta, eta=eta, alpha=alpha)
    if not isinstance(state, MemoryState) or not state.weights:
        raise TypeError(f"{name}: the state must be a MemoryState with at least one layer (see initial_memory_state)")
    if len(state.weights) != len(state.momentum):
        raise ValueError(f"{name}: the state has {len(state.weights)} weights but {len(state.momentum)} momenta")
    dims = [K]
    for i, (w, s) in enumerate(zip(state.weights, state.momentum)):
        if w.dim() != 4 or w.shape[:2] != (B, H) or w.shape[2] != dims[-1] or s.shape != w.shape:
            raise ValueError(
                f"{name}: state layer {i} must be [B, H, d_in, d_out] = [{B}, {H}, {dims[-1]}, d_out] for both the "
                f"weights and the momentum, got {tuple(w.shape)} and {tuple(s.shape)}"
            )
        dims.append(w.shape[3])
    if dims[-1] != v.shape[-1]:
        raise ValueError(f"{name}: the memory's last layer outputs {dims[-1]} values per head but v has {v.shape[-1]}")
    check_one_device(name, q, k, v, theta, eta, alpha, *state.weights, *state.momentum)
    check_chunk_size(name, chunk_size)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{name}: max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")


def titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    state: MemoryState,
    *,
    chunk_size: int = 16,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, MemoryState]:
    """Write every token into the memory and read each token's query from the memory updated up to that token.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (the layer L2-normalises them).
        v: ``[B, T, H, V]`` values.
        theta: ``[B, T, H]`` inner learning rate (>= 0); eta: momentum decay in [0, 1]; alpha: forgetting in [0, 1]
            (0 keeps the memory, 1 clears it).
        state: the memory before the first token (``initial_memory_state(init_weights, B)`` for a fresh sequence):
            per layer, weights and momentum ``[B, H, d_in, d_out]``; d_0 = K and the last d_out = V.
        chunk_size: tokens whose gradients are taken at the same (chunk-start) weights. Unlike the delta rule's
            tiling this changes the model: 1 is the exact online rule, larger chunks are Titans' parallel training.
        activation: the MLP memory's non-linearity between layers (``"gelu"`` or ``"silu"``).
        max_grad_norm: clip each token's inner gradient (all layers together) to this Frobenius norm; None = plain
            gradient descent as in Titans. Clipping bounds every write, so with forgetting the memory stays bounded.
        backend: ``"auto"`` (Triton on CUDA when the kernels take these inputs, the reference otherwise),
            ``"triton"`` (depth 1 or 2, chunks of at most 64, fp32/fp16/bf16, K and V at most 128) or ``"reference"``.

    Returns:
        ``y`` ``[B, T, H, V]`` in v's dtype, and the state after the last token.
    """
    _check_inputs(q, k, v, theta, eta, alpha, state, chunk_size, activation, max_grad_norm)
    if resolve_backend("titans_memory", backend, q, AVAILABLE_BACKENDS) == "triton":
        from kernels.titans_memory import autograd

        reason = autograd.unsupported(q.dtype, q.shape[-1], v.shape[-1], len(state.weights), chunk_size)
        if takes_inputs("titans_memory", backend, reason, autograd.unverified(chunk_size)):
            return autograd.triton_titans_memory(
                q,
                k,
                v,
                theta,
                eta,
                alpha,
                state,
                chunk_size=chunk_size,
                activation=activation,
                max_grad_norm=max_grad_norm,
            )
    return chunk_titans_memory(
        q,
        k,
        v,
        theta,
        eta,
        alpha,
        state,
        chunk_size=chunk_size,
        activation=activation,
        max_grad_norm=max_grad_norm,
    )
