"""The math the memory ops share (the Titans memory, ``titans_memory/``, and HOPE's self-modifying memory,
``self_modifying/``), in pure PyTorch: the MLP memory's activation and its derivative, the per-token inner
gradients as outer-product factors, the per-token gradient clip, and the products of decays over a chunk's segments.
The readme of each op derives where they enter."""

from __future__ import annotations

import math

import torch

ACTIVATIONS = ("gelu", "silu")


def phi(z: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.nn.functional.gelu(z) if activation == "gelu" else torch.nn.functional.silu(z)


def phi_prime(z: torch.Tensor, activation: str) -> torch.Tensor:
    """phi'(z) in closed form (differentiable, so outer gradients flow through the inner gradients)."""
    if activation == "gelu":  # d/dz z Phi(z) = Phi(z) + z N(z)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    s = torch.sigmoid(z)  # d/dz z s(z) = s(z) (1 + z (1 - s(z)))
    return s * (1 + z * (1 - s))


def clip_factor(norm_sq: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, G / ||grad||) for a squared norm; exactly 1 (with zero gradient) below the threshold."""
    norm = norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny).sqrt()
    return max_grad_norm / torch.maximum(norm, norm.new_tensor(max_grad_norm))


def grad_factors(k, v, weights, activation, max_grad_norm=None):
    """Per-token gradients of ||M(k_s) - v_s||^2 at ``weights``, as factors: for layer l, the gradient of token s is
    the outer product inputs[l][s]^T deltas[l][s] (inputs [B, H, C, d_{l-1}], deltas [B, H, C, d_l]). With
    ``max_grad_norm`` each token's whole gradient (all layers) is scaled to at most that Frobenius norm; the norm of an
    outer product is the product of the factors' norms, so this needs no per-token gradient tensor either."""
    inputs, pre = [], []
    x = k
    for i, w in enumerate(weights):
        inputs.append(x)
        z = x @ w
        if i < len(weights) - 1:
            pre.append(z)
            x = phi(z, activation)
        else:
            x = z
    delta = 2 * (x - v)  # d/dy ||y - v||^2
    deltas = [delta]
    for i in range(len(weights) - 2, -1, -1):
        delta = (delta @ weights[i + 1].transpose(-1, -2)) * phi_prime(pre[i], activation)
        deltas.append(delta)
    deltas = deltas[::-1]
    if max_grad_norm is not None:
        norm_sq = sum(a.pow(2).sum(-1) * d.pow(2).sum(-1) for a, d in zip(inputs, deltas))  # [B, H, C]
        factor = clip_factor(norm_sq, max_grad_norm)[..., None]
        deltas = [d * factor for d in deltas]
    return inputs, deltas


def segment_products(x: torch.Tensor) -> torch.Tensor:
    """P[..., i, r] = prod_{r < j <= i} x_j for r <= i (1 on the diagonal), 0 above it; x [..., C] -> [..., C, C].

    Built with one cumprod per column, so zeros in x are exact (their gradients too), unlike ratios of cumprods or
    differences of log-cumsums."""
    C = x.shape[-1]
    idx = torch.arange(C, device=x.device)
    later = idx[None, :] > idx[:, None]  # [r, j]: j > r
    cp = torch.where(later, x[..., None, :], torch.ones_like(x)[..., None, :]).cumprod(-1)  # [..., r, i]
    causal = idx[:, None] >= idx[None, :]  # [i, r]: r <= i
    return cp.transpose(-1, -2).masked_fill(~causal, 0)
