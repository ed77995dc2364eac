"""The self-modifying Titans memory of HOPE (Nested Learning §8, Eq. 83-93): a main residual MLP memory and
generator memories that produce its keys, values, learning rate and retention from the input, every memory trained
online on its own self-generated values by Delta Gradient Descent with momentum, in a chunked closed form.

``self_modifying_titans`` is the public op; ``reference`` holds the token-by-token rule with autograd gradients (the
ground truth) and the chunked form it runs. The math is in README.md beside this file.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from kernels._checks import check_one_device
from kernels._dispatch import resolve_backend, takes_inputs
from kernels.memory_math import ACTIVATIONS
from kernels.self_modifying.reference import (
    SelfModState,
    check_chunk_sizes,
    chunk_self_modifying_titans,
    initial_self_mod_state,
    memory_names,
    recurrent_self_modifying_titans,
)

__all__ = [
    "ACTIVATIONS",
    "SelfModState",
    "chunk_self_modifying_titans",
    "initial_self_mod_state",
    "memory_names",
    "recurrent_self_modifying_titans",
    "self_modifying_titans",
]

# The Triton backend (the main memory on kernels/titans_memory's kernels) loads on first use.
AVAILABLE_BACKENDS = ("reference", "triton") if importlib.util.find_spec("triton") else ("reference",)

_NAME = "self_modifying_titans"


def _check_float(label: str, t: object) -> None:
    if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
        raise TypeError(f"{_NAME}: {label} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")


def _check_inputs(
    x,
    q,
    gate_w,
    gate_b,
    state,
    static_k,
    static_v,
    momentum_decay,
    chunk_size,
    memory_chunk_size,
    eta_max,
    activation,
    max_grad_norm,
) -> None:
    name = _NAME
    for label, t in (("x", x), ("q", q)):
        _check_float(label, t)
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be [B, T, H, K], got shape {tuple(x.shape)}")
    B, T, H, K = x.shape
    if T == 0:
        raise ValueError(f"{name}: the sequence is empty (T = 0); give at least one token")
    for label, t in (("q", q), ("static_k", static_k), ("static_v", static_v)):
        if t is None:
            continue
        _check_float(label, t)
        if t.shape != x.shape:
            raise ValueError(
                f"{name}: {label} must have x's shape [B, T, H, K] = {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: {label} must have x's dtype {x.dtype}, got {t.dtype}; cast it")
    _check_float("gate_w", gate_w)
    _check_float("gate_b", gate_b)
    if gate_w.shape != (2, H, K):
        raise ValueError(f"{name}: gate_w must be [2, H, K] = [2, {H}, {K}] (eta, alpha), got {tuple(gate_w.shape)}")
    if gate_b.shape != (2, H):
        raise ValueError(f"{name}: gate_b must be [2, H] = [2, {H}] (eta, alpha), got {tuple(gate_b.shape)}")
    if momentum_decay is not None:
        _check_float("momentum_decay", momentum_decay)
        if momentum_decay.shape != (H,):
            raise ValueError(
                f"{name}: momentum_decay must be [H] = [{H}] (one decay per head) or None (no momentum), "
                f"got {tuple(momentum_decay.shape)}"
            )

    if not isinstance(state, SelfModState) or not state.weights:
        raise TypeError(
            f"{name}: the state must be a SelfModState with at least one layer (see initial_self_mod_state)"
        )
    if len(state.weights) != len(state.momentum):
        raise ValueError(f"{name}: the state has {len(state.weights)} weights but {len(state.momentum)} momenta")
    names = memory_names(static_k is not None, static_v is not None)
    M = len(names)
    dims = [K]
    for i, (w, s) in enumerate(zip(state.weights, state.momentum)):
        _check_float(f"state layer {i}", w)
        _check_float(f"state momentum {i}", s)
        if w.dim() != 5 or w.shape[0] != B or w.shape[2] != H or w.shape[3] != dims[-1] or s.shape != w.shape:
            raise ValueError(
                f"{name}: state layer {i} must be [B, M, H, d_in, d_out] = [{B}, M, {H}, {dims[-1]}, d_out] for both "
                f"the weights and the momentum, got {tuple(w.shape)} and {tuple(s.shape)}"
            )
        if w.shape[1] != M:
            raise ValueError(
                f"{name}: the state holds {w.shape[1]} memories but these inputs need {M}: {', '.join(names)} "
                "(static keys or values drop their generator memory)"
            )
        dims.append(w.shape[4])
    if dims[-1] != K:
        raise ValueError(
            f"{name}: the memory's last layer outputs {dims[-1]} values per head but a residual memory needs K = {K}"
        )
    check_one_device(name, x, q, gate_w, gate_b, static_k, static_v, momentum_decay, *state.weights, *state.momentum)
    check_chunk_sizes(chunk_size, memory_chunk_size)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(eta_max, bool) or not isinstance(eta_max, (int, float)) or not eta_max > 0:
        raise ValueError(f"{name}: eta_max must be a number > 0 (the largest inner learning rate), got {eta_max!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"{name}: max_grad_norm must be > 0 or None (no clipping), got {max_grad_norm!r}")


def self_modifying_titans(
    x: torch.Tensor,
    q: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    state: SelfModState,
    *,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    momentum_decay: torch.Tensor | None = None,
    chunk_size: int = 16,
    memory_chunk_size: int = 16,
    eta_max: float = 0.1,
    dgd: bool = True,
    retention: bool = True,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, SelfModState]:
    """Generate each token's key, value, learning rate and retention from x, write the token into every memory, and
    read each query from the main memory as it stood before that token's write.

    Args:
        x: ``[B, T, H, K]`` the generators' inputs; q: ``[B, T, H, K]`` the main memory's queries.
        gate_w, gate_b: ``[2, H, K]`` and ``[2, H]``: the projections of the eta and alpha generators' outputs to
            per-head scalars (``eta = eta_max sigmoid(.)``, ``alpha = sigmoid(.)``).
        state: the memories before the first token (``initial_self_mod_state(init_weights, B)``): per layer, weights
            and momentum ``[B, M, H, d_in, d_out]`` with d_0 = d_L = K and M in the order of ``memory_names``.
        static_k, static_v: ``[B, T, H, K]`` keys / values to use instead of generating them (their generator memory
            is then absent from the state).
        momentum_decay: ``[H]`` momentum decay in [0, 1] per head, or None for no momentum.
        chunk_size: the generators' chunk (they generate from, and take their gradients at, the chunk-start weights).
        memory_chunk_size: the main memory's chunk; the smaller of the two must divide the larger. Both are model
            settings: 1 is the exact online rule.
        eta_max: the largest inner learning rate.
        dgd: Delta Gradient Descent (False: plain gradient descent); retention: the learned alpha (False: alpha = 1).
        activation: ``"gelu"`` or ``"silu"`` between the MLP layers.
        max_grad_norm: clip each token's inner gradient (all layers of one memory together) to this Frobenius norm.
        backend: ``"auto"`` (the main memory on the Triton kernels on CUDA when they take it, the reference
            otherwise), ``"triton"`` or ``"reference"``. The kernels take the main memory with ``dgd=False`` only; the
            generators always run in PyTorch.

    Returns:
        ``o`` ``[B, T, H, K]`` in x's dtype, and the state after the last token.
    """
    _check_inputs(
        x,
        q,
        gate_w,
        gate_b,
        state,
        static_k,
        static_v,
        momentum_decay,
        chunk_size,
        memory_chunk_size,
        eta_max,
        activation,
        max_grad_norm,
    )
    main_memory = None
    if resolve_backend(_NAME, backend, x, AVAILABLE_BACKENDS) == "triton":
        from kernels.self_modifying import autograd

        reason = autograd.unsupported(x, len(state.weights), memory_chunk_size)
        if takes_inputs(_NAME, backend, reason, autograd.unverified(memory_chunk_size)):
            main_memory = functools.partial(autograd.triton_main_memory, dot_dtype=x.dtype)
    return chunk_self_modifying_titans(
        x,
        q,
        gate_w,
        gate_b,
        state,
        static_k=static_k,
        static_v=static_v,
        momentum_decay=momentum_decay,
        chunk_size=chunk_size,
        memory_chunk_size=memory_chunk_size,
        eta_max=eta_max,
        dgd=dgd,
        retention=retention,
        activation=activation,
        max_grad_norm=max_grad_norm,
        main_memory=main_memory,
    )
