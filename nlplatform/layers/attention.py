"""Causal multi-head self-attention with grouped-query heads, RoPE and an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.layers.rope import RotaryEmbedding


class KVCache:
    """Preallocated keys and values of one attention layer, for incremental decoding.

    ``k`` and ``v`` are [B, H_kv, max_len, D] (the layout SDPA reads); the first ``length`` positions are filled.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, t, D] after the filled positions; return all keys and values so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} cached + {t} new tokens > max_len {self.max_len}")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # [B, H_kv, L, D]


class GrowingKVCache:
    """Keys and values kept by concatenation instead of in a preallocated buffer: the cache for attention inside a
    differentiable chunk loop (in-place writes into a buffer would invalidate the saved tensors of earlier chunks).
    ``append`` returns a new cache and leaves this one unchanged, so a caller can run an open chunk and discard it."""

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:
        self.k, self.v = k, v
        self.length = 0 if k is None else k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [B, H_kv, t, D] after the cached positions (in this object); return all keys and values."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v, self.length = k, v, k.shape[2]
        return k, v

    def copy(self) -> GrowingKVCache:
        return GrowingKVCache(self.k, self.v)

    def detach(self) -> GrowingKVCache:
        return GrowingKVCache(*(None if t is None else t.detach() for t in (self.k, self.v)))


class Attention(nn.Module):
    """Causal self-attention: no biases, RoPE on queries and keys, ``n_kv_heads`` key/value heads shared by groups
    of ``n_heads // n_kv_heads`` query heads (GQA; MQA when 1, MHA when equal to ``n_heads``)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        rope_theta: float = 10000.0,
        window: int | None = None,
        n_prefix: int = 0,
    ) -> None:
        """``window``: each query sees at most the ``window`` most recent positions (itself included), plus the first
        ``n_prefix`` positions always (a persistent prefix, Titans MAG/MAL); None is full causal attention."""
        super().__init__()
        if window is not None and window <= 0:
            raise ValueError(f"attention window must be > 0, got {window}")
        self.window, self.n_prefix = window, n_prefix
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(
                f"dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads}: need dim % n_heads == 0 and "
                "n_heads % n_kv_heads == 0"
            )
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)  # residual output projection
        self.rope = RotaryEmbedding(self.head_dim, rope_theta)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) projections; the residual output projection ``wo`` gets the depth-scaled ``out_std``."""
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of the scores and the weighted sum (QK^T and AV, 2 * 2 * H * D * T forward,
        x3 with backward) at context length ``seq_len``, not halved for causality: the PaLM convention."""
        context = seq_len if self.window is None else min(seq_len, self.window + self.n_prefix)
        return 12 * self.n_heads * self.head_dim * context

    def new_cache(
        self, batch_size: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        return KVCache(batch_size, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, cache: KVCache | GrowingKVCache | None = None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. With ``cache``, x holds the T tokens following the ``cache.length`` cached ones."""
        B, T, _ = x.shape
        offset = 0 if cache is None else cache.length
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, H_kv, D]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q = self.rope(q, offset).transpose(1, 2)  # [B, H, T, D]
        k = self.rope(k, offset).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)  # [B, H_kv, offset + T, D]

        mask, causal = None, True
        if self.window is not None:  # sliding window with an always-visible prefix
            causal = False
            q_pos = torch.arange(offset, offset + T, device=x.device)[:, None]
            k_pos = torch.arange(offset + T, device=x.device)[None, :]
            mask = (k_pos <= q_pos) & ((q_pos - k_pos < self.window) | (k_pos < self.n_prefix))
        elif offset > 0:
            causal = False  # SDPA's is_causal aligns the mask top-left, wrong when queries start at `offset`
            if T > 1:
                # query i sits at position offset + i and sees keys 0 .. offset + i
                mask = torch.ones(T, offset + T, dtype=torch.bool, device=x.device).tril(diagonal=offset)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and T > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )  # [B, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
