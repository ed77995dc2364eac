"""Titans (Titans: Learning to Memorize at Test Time, §3-4): a neural long-term memory, a deep MLP trained online inside
the forward pass, in four variants.

The memory (``kernels.titans_memory``; Titans Eq. 13-18): per head an MLP ``M`` without biases, depth
``memory_depth`` (1 = a linear matrix memory), written at every token by one step of gradient descent with momentum
and forgetting on ``||M(k_t) - v_t||^2``, with data-dependent rates ``theta_t`` (learning rate), ``eta_t``
(momentum decay) and ``alpha_t`` (forgetting); token t reads ``y_t = M_t(q_t)``. Gradients of a chunk of
``memory_chunk_size`` tokens are taken at the chunk-start weights (Titans §3.2): that is a model setting, and the
memory is an in-context level with that chunk size. Its initial weights are meta-learned by the outer optimizer.

Memory branch (Titans §4.4): q, k, v projections -> causal short conv -> SiLU; q and k L2-normalised; per head
``theta = theta_max * sigmoid(.)``, ``eta = sigmoid(.)``, ``alpha = sigmoid(.)`` from linear maps of x (with
biases); the memory; per-head RMSNorm times ``silu(W_g x)``; output projection. Every mixer prepends
``n_persistent`` learnable tokens (Titans Eq. 19) to its input and drops their outputs.

Variants (the ``variant`` field), each a token mixer in Llama-style blocks ``x + mixer(norm(x))``, ``x + swiglu``:

- ``lmm``: the memory branch alone (the "Titans (LMM)" baseline of the Nested Learning tables).
- ``mag``: sliding-window attention (window ``window``, the persistent prefix always visible) gated by the memory
  branch: ``o = norm(attn) * sigmoid(norm(memory))`` (Eq. 26-28).
- ``mal``: the memory branch, then sliding-window attention over its output (Eq. 29-31).
- ``mac``: the sequence in segments of ``window`` tokens; each segment retrieves ``h = M(q)`` from the memory as it
  stood at the segment start, attends causally over ``[persistent | h | segment]``, writes the attention output
  ``y`` into the memory and returns ``y * M(y)`` (Eq. 21-25).

Decoding is exact: a mixer keeps its state at the last chunk (``lmm``/``mag``/``mal``) or segment (``mac``)
boundary and recomputes the open chunk or segment from there at every step, so ``step`` equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.titans_memory import (
    ACTIVATIONS,
    AVAILABLE_BACKENDS,
    MemoryState,
    initial_memory_state,
    memory_read,
    titans_memory,
)
from nlplatform.errors import ConfigError
from nlplatform.layers import Attention, GatedRMSNorm, KVCache, RMSNorm, ShortConv
from nlplatform.levels import Level
from nlplatform.models.base import DecoderConfig, DecoderLM, ModelSpec, check_kernel_backend
from nlplatform.validate import one_of, positive

VARIANTS = ("lmm", "mac", "mag", "mal")


@dataclass
class TitansConfig(DecoderConfig):
    """Sizes of a Titans model; the defaults are the ``tiny`` preset's."""

    variant: str = "lmm"  # lmm (memory only) | mac (memory as context) | mag (as gate) | mal (as layer)
    n_heads: int = 4  # memory heads, each its own MLP memory over head_dim-wide keys
    head_dim: int | None = None  # key/query/value width per head; None = d_model / n_heads
    memory_depth: int = 2  # L_M: layers of the MLP memory (1 = linear matrix memory; Titans: deeper is better)
    memory_expansion: int = 4  # hidden width of the memory MLP = memory_expansion * head_dim (depth >= 2)
    memory_activation: str = "gelu"  # the memory MLP's non-linearity (gelu or silu)
    memory_chunk_size: int = 16  # tokens whose inner gradients share the chunk-start weights (paper: unknown)
    theta_max: float = 0.1  # upper bound of the inner learning rate theta_t = theta_max * sigmoid(.)
    # clip each token's inner gradient (all memory layers) to this norm; None = plain GD as in Titans. Bounded writes
    # plus forgetting keep the memory bounded: without it the deep memory can diverge inside a window mid-training
    memory_max_grad_norm: float | None = 1.0
    alpha_bias_init: float = -4.0  # initial bias of the forgetting gate: sigmoid(-4) = 0.018, a slowly fading memory
    conv_size: int = 4  # causal depthwise conv width after the q, k, v projections; 0 = none
    n_persistent: int = 4  # N_p learnable persistent-memory tokens prepended in every mixer (paper: unknown)
    attn_heads: int = 4  # attention heads of mac / mag / mal
    window: int = 64  # sliding-window size (mag / mal) and segment length (mac)

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of("model", "variant", self.variant, VARIANTS)
        positive(
            "model",
            n_heads=self.n_heads,
            head_dim=self.head_dim,
            memory_depth=self.memory_depth,
            memory_expansion=self.memory_expansion,
            memory_chunk_size=self.memory_chunk_size,
            attn_heads=self.attn_heads,
            window=self.window,
        )
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), "
                "or set model.head_dim"
            )
        if self.memory_activation not in ACTIVATIONS:
            raise ConfigError(f"model.memory_activation must be one of {ACTIVATIONS}, got {self.memory_activation!r}")
        if self.memory_max_grad_norm is not None and not self.memory_max_grad_norm > 0:
            raise ConfigError(f"model.memory_max_grad_norm must be > 0 or null, got {self.memory_max_grad_norm}")
        if not self.theta_max > 0:
            raise ConfigError(f"model.theta_max must be > 0, got {self.theta_max}")
        if self.conv_size < 0 or self.n_persistent < 0:
            raise ConfigError("model.conv_size and model.n_persistent must be >= 0")
        if self.variant != "lmm" and self.d_model % self.attn_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.attn_heads ({self.attn_heads})"
            )
        if self.variant != "lmm" and (self.d_model // self.attn_heads) % 2:
            raise ConfigError("model.d_model / model.attn_heads must be even (rotary embeddings)")
        check_kernel_backend(self.kernel_backend, AVAILABLE_BACKENDS, "Titans memory op")

    @property
    def key_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def memory_dims(self) -> list[int]:
        """Widths d_0 .. d_L of one head's memory MLP."""
        K = self.key_dim
        return [K] + [self.memory_expansion * K] * (self.memory_depth - 1) + [K]


# ----------------------------------------------------------------------------------------------- memory branch


@dataclass
class BranchState:
    """Decoding state of a memory branch at the last committed boundary, plus the inputs since then."""

    memory: MemoryState | None = None  # None: the learned initial memory
    conv: torch.Tensor | None = None  # the short conv's last inputs at the boundary
    pending: torch.Tensor | None = None  # branch inputs [B, n, d] after the boundary (n < the commit period)


class MemoryBranch(nn.Module):
    """``x [B, T, d] -> [B, T, d]``: projections, the Titans memory per head, gated norm, output projection."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, K = cfg.n_heads, cfg.key_dim
        self.n_heads, self.key_dim = H, K
        self.qkv = nn.Linear(cfg.d_model, 3 * H * K, bias=False)
        self.conv = ShortConv(3 * H * K, cfg.conv_size) if cfg.conv_size > 0 else None
        self.gates = nn.Linear(cfg.d_model, 3 * H, bias=True)  # theta, eta, alpha per head
        dims = cfg.memory_dims
        # the memory's initial weights, one MLP per head: meta-learned by the outer optimizer (Titans §3.1)
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(H, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.g_proj = nn.Linear(cfg.d_model, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, cfg.norm_eps)
        self.o_proj = nn.Linear(H * K, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.qkv, self.gates, self.g_proj):
            nn.init.normal_(lin.weight, std=std)
        H = self.n_heads
        self.gates.bias.zero_()
        self.gates.bias[2 * H :] = self.cfg.alpha_bias_init
        for w in self.memory_init:  # variance-preserving per layer
            nn.init.normal_(w, std=1 / math.sqrt(w.shape[1]))
        if self.conv is not None:
            self.conv.reset_parameters()
        self.o_norm.reset_parameters()
        nn.init.normal_(self.o_proj.weight, std=out_std)

    def fresh_memory(self, batch_size: int, dtype: torch.dtype) -> MemoryState:
        acc = torch.promote_types(dtype, torch.float32)
        return initial_memory_state(tuple(w.to(acc) for w in self.memory_init), batch_size)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Retrieval queries without the conv (MAC's ``q = S W_Q`` for a segment): [B, T, H, K], L2-normalised."""
        H, K = self.n_heads, self.key_dim
        q = F.silu(F.linear(x, self.qkv.weight[: H * K]))
        return F.normalize(q.view(*x.shape[:2], H, K), dim=-1, eps=1e-6)

    def read(self, x: torch.Tensor, memory: MemoryState | None) -> torch.Tensor:
        """Retrieval without update, projected back to the model width: ``o_proj(M(q(x)))`` [B, T, d]."""
        B, T, _ = x.shape
        memory = self.fresh_memory(B, x.dtype) if memory is None else memory
        y = memory_read(
            self.queries(x).transpose(1, 2).to(memory.weights[0].dtype), memory.weights, self.cfg.memory_activation
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))

    def run(
        self, x: torch.Tensor, memory: MemoryState | None, conv: torch.Tensor | None
    ) -> tuple[torch.Tensor, MemoryState, torch.Tensor | None]:
        """Write x into the memory from ``memory`` (None = the learned initial one): (output, memory, conv cache)."""
        B, T, _ = x.shape
        H, K = self.n_heads, self.key_dim
        qkv = self.qkv(x)
        if self.conv is None:
            qkv, conv = F.silu(qkv), None
        else:
            qkv, conv = self.conv(qkv, conv)
        q, k, v = qkv.view(B, T, 3, H, K).unbind(2)
        # CUDA autocast computes the norm in fp32, which would promote q and k: keep them in the projection's dtype
        q = F.normalize(q, dim=-1, eps=1e-6).to(qkv.dtype)
        k = F.normalize(k, dim=-1, eps=1e-6).to(qkv.dtype)
        acc = torch.promote_types(x.dtype, torch.float32)
        theta, eta, alpha = torch.sigmoid(self.gates(x).to(acc)).view(B, T, 3, H).unbind(2)
        memory = self.fresh_memory(B, x.dtype) if memory is None else memory
        y, memory = titans_memory(
            q,
            k,
            v,
            self.cfg.theta_max * theta,
            eta,
            alpha,
            memory,
            chunk_size=self.cfg.memory_chunk_size,
            activation=self.cfg.memory_activation,
            max_grad_norm=self.cfg.memory_max_grad_norm,
            backend=self.cfg.kernel_backend,
        )
        y = self.o_norm(y, self.g_proj(x).view(B, T, H, K))
        return self.o_proj(y.reshape(B, T, H * K)), memory, conv

    def forward(self, x: torch.Tensor, state: BranchState | None = None) -> torch.Tensor:
        """Training: one pass from the initial memory. Decoding: recompute the open chunk from the last boundary."""
        if state is None:
            return self.run(x, None, None)[0]
        return stream(x, state, self.cfg.memory_chunk_size, self.run)

    def flops_per_token(self, seq_len: int) -> int:
        """Memory FLOPs per token beyond the projections, per head and MLP layer (d_in x d_out): forward at the chunk
        start, backprop of the inner loss, the state update and the exact read (~8 d_in d_out + 4 C (d_in + d_out)),
        x3 with backward."""
        C = min(self.cfg.memory_chunk_size, seq_len)
        dims = self.cfg.memory_dims
        per_layer = sum(8 * a * b + 4 * C * (a + b) for a, b in zip(dims[:-1], dims[1:]))
        return 3 * self.n_heads * per_layer


def stream(x: torch.Tensor, state: BranchState, period: int, run) -> torch.Tensor:
    """Exact incremental processing for mixers whose state only changes at boundaries every ``period`` inputs.

    ``run(inputs, memory, conv) -> (output, memory, conv)`` processes inputs from the committed state; the state
    reached at the last boundary is committed, and the open inputs after it are kept in ``state.pending`` and
    recomputed from there at the next call."""
    xs = x if state.pending is None else torch.cat([state.pending, x], dim=1)
    n = xs.shape[1]
    done = (n // period) * period
    outs = []
    if done:
        out, state.memory, state.conv = run(xs[:, :done], state.memory, state.conv)
        outs.append(out)
    if done < n:
        outs.append(run(xs[:, done:], state.memory, state.conv)[0])
    state.pending = xs[:, done:] if done < n else None
    return torch.cat(outs, dim=1)[:, n - x.shape[1] :]


# ----------------------------------------------------------------------------------------------------- mixers


@dataclass
class TitansLayerState:
    """Decoding state of one Titans mixer: its memory branch and, for mag / mal, the attention's KV cache."""

    branch: BranchState = field(default_factory=BranchState)
    cache: KVCache | None = None


class TitansMixer(nn.Module):
    """One Titans token mixer of the configured variant, with its persistent tokens: ``x [B, T, d] -> [B, T, d]``."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.variant = cfg.variant
        self.persistent = nn.Parameter(torch.empty(cfg.n_persistent, cfg.d_model))
        self.branch = MemoryBranch(cfg)
        self.attn = None
        if cfg.variant in ("mag", "mal"):
            self.attn = Attention(cfg.d_model, cfg.attn_heads, window=cfg.window, n_prefix=cfg.n_persistent)
        elif cfg.variant == "mac":
            self.attn = Attention(cfg.d_model, cfg.attn_heads)
        if cfg.variant == "mag":  # the gate normalises both branches with learnable vector weights (Eq. 28)
            self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
            self.memory_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.persistent, std=std)
        self.branch.init_weights(std, out_std)
        if self.attn is not None:
            self.attn.init_weights(std, out_std)
        if self.variant == "mag":
            self.attn_norm.reset_parameters()
            self.memory_norm.reset_parameters()

    def flops_per_token(self, seq_len: int) -> int:
        n = self.branch.flops_per_token(seq_len)
        if self.attn is not None:
            n += self.attn.flops_per_token(min(seq_len, 2 * self.cfg.window + self.cfg.n_persistent))
        return n

    def _prefix(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def forward(self, x: torch.Tensor, state: TitansLayerState | None = None) -> torch.Tensor:
        if self.variant == "mac":
            return self._mac(x, state)
        if state is None:  # training / scoring: the persistent prefix, then the sequence
            x, P = self._prefix(x), self.cfg.n_persistent
            return self._mix(x, None)[:, P:]
        return self._mix(x, state)

    def _mix(self, x: torch.Tensor, state: TitansLayerState | None) -> torch.Tensor:
        branch, cache = (None, None) if state is None else (state.branch, state.cache)
        if self.variant == "lmm":
            return self.branch(x, branch)
        if self.variant == "mal":
            return self.attn(self.branch(x, branch), cache)
        m = self.branch(x, branch)  # mag
        return self.attn_norm(self.attn(x, cache)) * torch.sigmoid(self.memory_norm(m))

    def prefill(self, state: TitansLayerState, batch_size: int, dtype: torch.dtype) -> None:
        """Feed the persistent tokens into a fresh decoding state (their outputs are not used)."""
        if self.variant != "mac" and self.cfg.n_persistent:
            device = self.persistent.device
            self._mix(self.persistent.to(dtype).expand(batch_size, -1, -1).to(device), state)

    # -- MAC: segments with the memory as context

    def _segment(self, x: torch.Tensor, memory: MemoryState | None, conv: torch.Tensor | None):
        """One segment (or its open part) from the memory at the segment start: (output, memory, conv cache)."""
        B, S, d = x.shape
        P = self.cfg.n_persistent
        h = self.branch.read(x, memory)  # retrieval from the segment-start memory
        ctx = torch.cat([self.persistent.to(x.dtype).expand(B, -1, -1), h, x], dim=1)  # [B, P + 2S, d]
        y = self._context_attention(ctx, P, S)
        m, memory, conv = self.branch.run(y, memory, conv)  # write the attention output, read M_t(y_t)
        return y * m, memory, conv

    def _context_attention(self, ctx: torch.Tensor, P: int, S: int) -> torch.Tensor:
        """Queries at the segment's tokens; token i sees the persistent tokens, h_j and x_j for j <= i (causal).
        Positions: persistent 0..P-1, h_j and x_j both at P + j."""
        attn = self.attn
        B = ctx.shape[0]
        D, Hh = attn.head_dim, attn.n_heads
        pos = torch.cat([torch.arange(P), torch.arange(P, P + S), torch.arange(P, P + S)]).to(ctx.device)
        q = attn.wq(ctx[:, P + S :]).view(B, S, Hh, D)
        k = attn.wk(ctx).view(B, P + 2 * S, attn.n_kv_heads, D)
        v = attn.wv(ctx).view(B, P + 2 * S, attn.n_kv_heads, D).transpose(1, 2)
        q = attn.rope(q, positions=pos[P + S :]).transpose(1, 2)
        k = attn.rope(k, positions=pos).transpose(1, 2)
        i = torch.arange(S, device=ctx.device)[:, None]
        j = torch.arange(S, device=ctx.device)[None, :]
        causal = j <= i
        mask = torch.cat([torch.ones(S, P, dtype=torch.bool, device=ctx.device), causal, causal], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.wo(out.transpose(1, 2).reshape(B, S, Hh * D))

    def _mac(self, x: torch.Tensor, state: TitansLayerState | None) -> torch.Tensor:
        W = self.cfg.window
        if state is None:
            memory, conv, outs = None, None, []
            for start in range(0, x.shape[1], W):
                out, memory, conv = self._segment(x[:, start : start + W], memory, conv)
                outs.append(out)
            return torch.cat(outs, dim=1)
        branch = state.branch
        return stream(x, branch, W, self._segment)


# ------------------------------------------------------------------------------------------------------ model


@dataclass
class TitansState:
    """Decoding state of a Titans model: one mixer state per layer."""

    layers: list[TitansLayerState]
    batch_size: int
    length: int = 0


class Titans(DecoderLM):
    """Titans language model (variant from the config); ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: TitansConfig) -> None:
        super().__init__(cfg, lambda _: TitansMixer(cfg))
        # lmm and mac decode with a constant-size state; mag and mal also keep an attention KV cache
        self.recurrent = cfg.variant in ("lmm", "mac")

    def levels(self) -> list[Level]:
        """The memory (in-context, chunk ``memory_chunk_size``) and the weights (persistent)."""
        memory = Level(
            name="memory",
            chunk_size=self.cfg.memory_chunk_size,
            scope="in_context",
            update="GD with momentum and forgetting, gradients at the chunk-start weights (Titans Eq. 13-18)",
            objective="||M(k_t) - v_t||^2 per head",
        )
        return [memory, self.weights_level()]

    def init_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TitansState:
        """A fresh decoding state for ``batch_size`` sequences; mag and mal need ``max_len`` for their KV cache."""
        device, dtype = self._state_placement(batch_size, device, dtype)
        layers = []
        for block in self.layers:
            mixer = block.mixer
            cache = None
            if self.cfg.variant in ("mag", "mal"):
                if max_len is None:
                    raise ValueError(f"titans variant {self.cfg.variant!r} needs max_len for its attention cache")
                cache = mixer.attn.new_cache(batch_size, self.cfg.n_persistent + max_len, device, dtype)
            layer = TitansLayerState(BranchState(), cache)
            with torch.no_grad():
                mixer.prefill(layer, batch_size, dtype)
            layers.append(layer)
        return TitansState(layers, batch_size)

    def step(self, input_ids: torch.Tensor, state: TitansState) -> tuple[torch.Tensor, TitansState]:
        """Process ``input_ids`` [B, t] following the tokens ``state`` has seen; return logits [B, t, V]."""
        return self._step_layers(input_ids, state)


# Tiny: 4 layers of 256 like the other families (memory MLPs of 64 -> 256 -> 64 per head). Paper sizes follow the
# Transformer++ widths and depths (Titans' own layer counts are not published: Titans §5.1 gives sizes only).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4),
    "340m": dict(d_model=1024, n_layers=20, n_heads=8, attn_heads=16, window=512, memory_chunk_size=64),
    "760m": dict(d_model=1536, n_layers=22, n_heads=12, attn_heads=16, window=512, memory_chunk_size=64),
    "1.3b": dict(d_model=2048, n_layers=22, n_heads=16, attn_heads=16, window=512, memory_chunk_size=64),
}

SPECS = [ModelSpec("titans", TitansConfig, Titans, PRESETS)]
