"""Pure-PyTorch Titans neural memory: the token-by-token rule with autograd gradients (ground truth) and the
chunkwise-parallel form with closed-form per-token gradients as batched matmuls. The math is in this folder's README.

Shapes: q, k [B, T, H, K]; v [B, T, H, V]; theta, eta, alpha [B, T, H]. The memory of head h is an MLP without
biases, ``M(x) = phi(... phi(x W_1) ...) W_L`` with W_l [d_{l-1}, d_l], d_0 = K, d_L = V; its state is the weights
W_l [B, H, d_{l-1}, d_l] and the momentum S_l of the same shapes. Both forms compute in the promotion of the input
dtype and float32 and return y in v's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels.memory_math import clip_factor, grad_factors, phi, segment_products


class MemoryState(NamedTuple):
    """The fast state of a Titans memory: per layer, the weights M_l and the momentum S_l, each [B, H, d_in, d_out]."""

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]


def memory_read(x: torch.Tensor, weights: tuple[torch.Tensor, ...], activation: str = "gelu") -> torch.Tensor:
    """M(x) for x [B, H, N, K] and per-(batch, head) weights [B, H, d_in, d_out]: a retrieval without update."""
    for i, w in enumerate(weights):
        x = x @ w
        if i < len(weights) - 1:
            x = phi(x, activation)
    return x


def initial_memory_state(init_weights: tuple[torch.Tensor, ...], batch_size: int) -> MemoryState:
    """The state before the first token: the learned initial weights [H, d_in, d_out] for every sequence, no momentum."""
    weights = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in init_weights)
    return MemoryState(weights, tuple(torch.zeros_like(w) for w in weights))


def chunk_titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    initial_state: MemoryState,
    *,
    chunk_size: int = 16,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """The chunkwise-parallel memory (Titans §3.2, Eq. 16-18): inside a chunk every token's gradient is taken at the
    chunk-start weights, so all of them are batched matmuls; momentum and forgetting inside the chunk are folded into
    [C, C] lower-triangular coefficient matrices; token i reads from its own updated memory M_i, exactly.
    Only the state crosses chunk boundaries (a loop of ceil(T / C) steps). Returns (y, final state).
    """
    B, T, H, _ = q.shape
    acc, out_dtype = torch.promote_types(q.dtype, torch.float32), v.dtype
    q, k, v, theta, eta, alpha = (x.to(acc).transpose(1, 2) for x in (q, k, v, theta, eta, alpha))  # heads first
    weights = [w.to(acc) for w in initial_state.weights]
    momentum = [s.to(acc) for s in initial_state.momentum]
    L = len(weights)
    outs = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(start + chunk_size, T))
        # chunk-local products: beta_i = prod_{j<=i} (1 - alpha_j) and E_i = prod_{j<=i} eta_j, and their ratios
        # as segment products (no logs: eta = 0 and alpha = 1 are exact, gradients included)
        keep, e = 1 - alpha[:, :, sl], eta[:, :, sl]
        d_beta, d_eta = segment_products(keep), segment_products(e)  # beta_i / beta_r and E_r / E_s, [B, H, C, C]
        c = keep.cumprod(-1)  # weight of M_0 in M_i, [B, H, C]
        big_e = e.cumprod(-1)
        d = d_beta @ big_e[..., None]  # weight of S_0 in M_i: sum_{r<=i} (beta_i / beta_r) E_r, [B, H, C, 1]
        gamma = (d_beta @ d_eta) * theta[:, :, None, sl]  # weight of -u_s in M_i, [B, H, C, C]
        inputs, deltas = grad_factors(k[:, :, sl], v[:, :, sl], weights, activation, max_grad_norm)
        # retrieval from M_i: x W_i = c_i x W_0 + d_i x S_0 - sum_s gamma_is (x . a_s) delta_s, layer after layer
        x = q[:, :, sl]
        for i in range(L):
            z = c[..., None] * (x @ weights[i]) + d * (x @ momentum[i])
            z = z - (gamma * (x @ inputs[i].transpose(-1, -2))) @ deltas[i]
            x = phi(z, activation) if i < L - 1 else z
        outs.append(x)
        # the state after the chunk's last token
        e_last = big_e[..., -1, None, None]
        coef_m = gamma[..., -1, :, None]  # [B, H, C, 1]
        coef_s = (d_eta[..., -1, :] * theta[:, :, sl])[..., None]
        new_w = [
            c[..., -1, None, None] * w + d[..., -1, :, None] * s - inp.transpose(-1, -2) @ (coef_m * dl)
            for w, s, inp, dl in zip(weights, momentum, inputs, deltas)
        ]
        momentum = [e_last * s - inp.transpose(-1, -2) @ (coef_s * dl) for s, inp, dl in zip(momentum, inputs, deltas)]
        weights = new_w
    y = torch.cat(outs, dim=2).transpose(1, 2).to(out_dtype)
    return y, MemoryState(tuple(weights), tuple(momentum))


def recurrent_titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    eta: torch.Tensor,
    alpha: torch.Tensor,
    initial_state: MemoryState,
    *,
    chunk_size: int = 1,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, MemoryState]:
    """Token by token, as written in Titans Eq. 13-15, with the gradient from autograd (independent of the closed
    form above): ``S_t = eta_t S_{t-1} - theta_t grad``, ``M_t = (1 - alpha_t) M_{t-1} + S_t``, ``y_t = M_t(q_t)``.
    The gradient of token t is taken at the weights of the last chunk start (t' = t - t mod chunk_size): chunk_size 1
    is the exact online rule, larger chunks the rule the chunkwise form computes. O(T) steps: a test oracle.
    """
    B, T, H, _ = q.shape
    acc, out_dtype = torch.promote_types(q.dtype, torch.float32), v.dtype
    q, k, v, theta, eta, alpha = (x.to(acc) for x in (q, k, v, theta, eta, alpha))
    weights = [w.to(acc) for w in initial_state.weights]
    momentum = [s.to(acc) for s in initial_state.momentum]
    if torch.is_inference_mode_enabled():
        raise RuntimeError("recurrent_titans_memory takes its gradients with autograd: call it outside inference_mode")
    outer = torch.is_grad_enabled()  # whether outer gradients must flow through the inner ones
    outs = []
    with torch.enable_grad():
        for t in range(T):
            if t % chunk_size == 0:  # the chunk-start weights every gradient of the chunk is taken at
                anchor = [w if outer and w.requires_grad else w.detach().requires_grad_() for w in weights]
            pred = memory_read(k[:, t, :, None, :], anchor, activation)  # [B, H, 1, V]
            loss = (pred.squeeze(2) - v[:, t]).pow(2).sum()
            grads = torch.autograd.grad(loss, anchor, create_graph=outer)
            if max_grad_norm is not None:  # clip the token's whole gradient (all layers) to max_grad_norm
                factor = clip_factor(sum(g.pow(2).sum((-1, -2)) for g in grads), max_grad_norm)[..., None, None]
                grads = [g * factor for g in grads]
            th, et, al = (x[:, t, :, None, None] for x in (theta, eta, alpha))
            momentum = [et * s - th * g for s, g in zip(momentum, grads)]
            weights = [(1 - al) * w + s for w, s in zip(weights, momentum)]
            outs.append(memory_read(q[:, t, :, None, :], weights, activation).squeeze(2))
    y = torch.stack(outs, dim=1).to(out_dtype)
    return y, MemoryState(tuple(weights), tuple(momentum))
