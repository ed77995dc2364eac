"""Pure-PyTorch (gated) delta rule: the step-by-step recurrence that defines correctness, and the exact chunkwise
WY/UT form that CPU training runs. Both are differentiable by autograd. The math is in this folder's README.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H]; state S [B, H, K, V] (the transpose of the paper's
S_t in R^{d_v x d_k}, so that the read-out is o_t = S_t^T q_t and the memory's prediction for a key is S_t^T k_t).
Both functions compute in the promotion of the input dtype and float32 (fp64 stays fp64), return ``o`` in v's dtype
and the final state in that accumulation dtype.
"""

from __future__ import annotations

import torch


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token at a time: ``S_t = a_t S_{t-1} + k_t (beta_t (v_t - a_t S_{t-1}^T k_t))^T``, ``o_t = scale S_t^T q_t``
    with ``a_t = exp(g_t)`` (1 when ``g`` is None). O(T) sequential steps: the ground truth, not a training path."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc, out_dtype = _accumulation_dtype(q), v.dtype
    q, k, v, beta = (x.to(acc) for x in (q, k, v, beta))
    q = q * scale
    decay = None if g is None else g.to(acc).exp()
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for t in range(T):
        if decay is not None:
            S = S * decay[:, t, :, None, None]
        k_t = k[:, t]  # [B, H, K]
        u_t = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S))  # [B, H, V]
        S = S + k_t[..., :, None] * u_t[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, dim=1).to(out_dtype)  # [B, T, H, V]
    return o, (S if output_final_state else None)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same map, computed chunk by chunk (GDN Eq. 6-9 and §3.3): everything inside a chunk is parallel matmuls
    and one unit-lower-triangular solve, for all chunks at once; only the [K, V] state is carried across chunks.

    A chunk is ``min(chunk_size, T)`` tokens; a last partial chunk is padded with k = v = beta = g = 0, tokens that
    leave the state unchanged, so the final state is exact.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    acc, out_dtype = _accumulation_dtype(q), v.dtype

    def chunks(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, ...] -> [B, H, N, C, ...] in the accumulation dtype
        x = x.to(acc).transpose(1, 2)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(B, H, N, C, *x.shape[3:])

    q, k, v, beta = chunks(q), chunks(k), chunks(v), chunks(beta)
    q = q * scale
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # i >= j
    if g is None:
        decay_ij = causal.to(acc)  # [C, C]
        gamma = gamma_last = k_out = None
    else:
        gc = chunks(g).cumsum(dim=-1)  # log gamma_i = sum of g over the chunk up to i: [B, H, N, C]
        # gamma_i / gamma_j for i >= j (<= 1, so exp never overflows); masked to -inf above the diagonal before exp.
        decay_ij = (gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, C, C]
        gamma = gc.exp()[..., None]  # [B, H, N, C, 1]
        gamma_last = gc[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]
        k_out = k * (gc[..., -1:] - gc).exp()[..., None]  # k_i * gamma_C / gamma_i: what reaches the chunk's end

    # UT transform: (I + A) [U~ | W] = [diag(beta) V | diag(beta gamma) K], A = strictLower(diag(beta) (Gamma * K K^T)).
    A = (k @ k.transpose(-1, -2)) * decay_ij * beta[..., None]
    rhs_w = k if gamma is None else k * gamma
    rhs = torch.cat([v, rhs_w], dim=-1) * beta[..., None]  # [B, H, N, C, V + K]
    # unitriangular=True reads only the strictly lower part of A and takes the diagonal as 1.
    sol = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u_tilde, w = sol.split([V, K], dim=-1)
    attn = (q @ k.transpose(-1, -2)) * decay_ij  # intra-chunk scores, diagonal included: [B, H, N, C, C]

    # The only sequential part: carry S across chunks. u_n = U~_n - W_n S_n are the chunk's effective new values.
    # Per-chunk operands come from unbind (one gradient stack in backward, not one zero-filled tensor per chunk).
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    writers = (k if k_out is None else k_out).transpose(-1, -2).unbind(dim=2)  # keys as they reach the chunk end
    decays = [None] * N if gamma_last is None else gamma_last.unbind(dim=2)
    starts, values = [], []
    for u_n, w_n, k_n, d_n in zip(u_tilde.unbind(dim=2), w.unbind(dim=2), writers, decays):
        u = u_n - w_n @ S  # [B, H, C, V]
        starts.append(S)
        values.append(u)
        S = (S if d_n is None else S * d_n) + k_n @ u
    S_starts = torch.stack(starts, dim=2)  # [B, H, N, K, V]
    u = torch.stack(values, dim=2)  # [B, H, N, C, V]
    q_in = q if gamma is None else q * gamma  # gamma_i q_i reads the chunk-start state decayed to position i
    o = q_in @ S_starts + attn @ u  # [B, H, N, C, V]
    o = o.reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(out_dtype)
    return o, (S if output_final_state else None)
