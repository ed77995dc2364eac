"""The (gated) delta rule: DeltaNet's and Gated DeltaNet's token mixer, and the linear-memory core of Titans/HOPE.

``gated_delta_rule`` is the public op; ``reference`` holds the step-by-step recurrence (ground truth) and the chunked
form it runs on the reference backend. The math is in README.md beside this file.
"""

from __future__ import annotations

import importlib.util

import torch

from kernels._checks import check_chunk_size, check_one_device, check_per_token, check_qkv
from kernels._dispatch import resolve_backend, takes_inputs
from kernels.delta_rule.reference import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule", "recurrent_gated_delta_rule"]

# The Triton kernels (autograd.py and the kernel files it imports) load on first use, so that CPU runs never import
# triton and TRITON_INTERPRET is read only when a kernel is really wanted.
AVAILABLE_BACKENDS = ("reference", "triton") if importlib.util.find_spec("triton") else ("reference",)
# On the reference backend, sequences this short (decoding steps) run the recurrence instead of the chunked form.
RECURRENT_MAX_T = 8


def _check_inputs(q, k, v, beta, g, initial_state, chunk_size) -> None:
    name = "gated_delta_rule"
    B, T, H, K = check_qkv(name, q, k, v)
    check_per_token(name, (B, T, H), beta=beta, g=g)
    if initial_state is not None:
        if not (isinstance(initial_state, torch.Tensor) and initial_state.is_floating_point()):
            raise TypeError(f"{name}: initial_state must be a floating-point tensor, got {type(initial_state)}")
        if initial_state.shape != (B, H, K, v.shape[-1]):
            raise ValueError(
                f"{name}: initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}], "
                f"got {tuple(initial_state.shape)}"
            )
    check_one_device(name, q, k, v, beta, g, initial_state)
    check_chunk_size(name, chunk_size)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the (gated) delta rule over a sequence; return ``(o, final_state)``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys. Not normalised here: the layer L2-normalises them.
        v: ``[B, T, H, V]`` values.
        beta: ``[B, T, H]`` writing strength (in (0, 1), or (0, 2) to allow negative eigenvalues).
        g: ``[B, T, H]`` log decay (``alpha_t = exp(g_t)``, so g <= 0); ``None`` is plain DeltaNet (no decay).
        scale: read-out scale on q; default ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token; default zeros.
        output_final_state: also return the state after the last token (in float32, or float64 for fp64 inputs).
        chunk_size: tokens per chunk of the exact chunkwise algorithm: a speed setting that does not change the
            result beyond rounding. Any T works: a partial last chunk is padded internally.
        backend: ``"auto"`` (Triton on CUDA when the kernels take these inputs, the reference otherwise),
            ``"triton"`` (chunk sizes 16, 32, 64; fp32/fp16/bf16; K <= 256) or ``"reference"``.

    Returns:
        ``o`` ``[B, T, H, V]`` in v's dtype, and the final state or ``None``.
    """
    _check_inputs(q, k, v, beta, g, initial_state, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    run = chunk_gated_delta_rule
    if resolve_backend("gated_delta_rule", backend, q, AVAILABLE_BACKENDS) == "triton":
        from kernels.delta_rule import autograd

        if takes_inputs("gated_delta_rule", backend, autograd.unsupported(q, chunk_size)):
            run = autograd.triton_gated_delta_rule
    if run is chunk_gated_delta_rule and q.shape[1] <= RECURRENT_MAX_T:
        # Decoding steps: a few tokens are cheaper one by one than padded to a chunk with its triangular solve.
        return recurrent_gated_delta_rule(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    return run(
        q,
        k,
        v,
        beta,
        g,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        chunk_size=chunk_size,
    )
