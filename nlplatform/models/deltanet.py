"""DeltaNet and Gated DeltaNet (Yang et al., 2024 and 2025): linear-attention memories trained online by the delta rule.

Each layer keeps, per head, a matrix memory ``S`` [K, V]. At every token it takes one gradient step of size
``beta_t`` on ``||S^T k_t - v_t||^2`` (DeltaNet); Gated DeltaNet first decays the memory by a data-dependent
``alpha_t = exp(g_t)`` with Mamba2's parameterisation. Read-out: ``o_t = S_t^T q_t``. In Nested Learning terms
(Nested Learning arXiv §5) the memory is an in-context level updated at every token (chunk 1), nested inside the
persistent level of the weights that produce q, k, v, beta and alpha. ``model.chunk_size`` is only the tiling of the
exact chunkwise algorithm in ``kernels.delta_rule``: a speed setting that does not change the model.

Layer (Gated DeltaNet Fig. 1, FLA's DeltaNet / GatedDeltaNet layers): q, k, v projections -> causal short conv (width 4)
-> SiLU -> L2-normalised q and k; beta = sigmoid(W_b x) (x2 with negative eigenvalues allowed); the delta rule per head;
per-head RMSNorm of the output (times silu(W_g x) with the output gate, Gated DeltaNet's default); output projection.
Blocks are Llama-style: ``x + mixer(norm(x))``, ``x + swiglu(norm(x))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kernels.delta_rule import AVAILABLE_BACKENDS, gated_delta_rule
from nlplatform.errors import ConfigError
from nlplatform.layers import GatedRMSNorm, RMSNorm, ShortConv
from nlplatform.levels import Level
from nlplatform.models.base import DecoderConfig, DecoderLM, ModelSpec, check_kernel_backend
from nlplatform.validate import positive


@dataclass
class DeltaNetConfig(DecoderConfig):
    """Sizes of a DeltaNet; the defaults are the ``tiny`` preset."""

    gated: ClassVar[bool] = False  # Gated DeltaNet's config sets this: a decay gate before each delta-rule step

    n_heads: int = 4  # memory heads, each an independent [head_dim, value_dim] matrix memory
    head_dim: int | None = None  # key/query width per head (the memory's K); None = d_model / n_heads
    expand_v: float = 1.0  # value width per head = expand_v * head_dim (Gated DeltaNet uses 2)
    conv_size: int = 4  # causal depthwise conv width on q, k, v (GDN Table S.1: crucial); 0 = no conv
    allow_neg_eigval: bool = False  # beta in (0, 2): I - beta k k^T may then have negative eigenvalues
    output_gate: bool = False  # RMSNorm(o) * silu(W_g x) per head (Gated DeltaNet) instead of RMSNorm(o)
    # tiling of the exact chunkwise algorithm (speed only; same model): a power of two, 16-256; the Triton kernels
    # tile 16, 32 or 64, and larger sizes run the PyTorch reference even on a GPU
    chunk_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("model", n_heads=self.n_heads, head_dim=self.head_dim)
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), "
                "or set model.head_dim"
            )
        if not self.expand_v > 0 or (self.expand_v * self.key_dim) % 1:
            raise ConfigError(
                f"model.expand_v ({self.expand_v}) times the head width ({self.key_dim}) must be a positive integer"
            )
        if self.conv_size < 0:
            raise ConfigError(f"model.conv_size must be >= 0 (0 = no short convolution), got {self.conv_size}")
        if self.chunk_size not in (16, 32, 64, 128, 256):
            raise ConfigError(f"model.chunk_size must be a power of two from 16 to 256, got {self.chunk_size}")
        check_kernel_backend(self.kernel_backend, AVAILABLE_BACKENDS, "delta-rule op")

    @property
    def key_dim(self) -> int:
        """K, the key/query width of one head."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def value_dim(self) -> int:
        """V, the value width of one head."""
        return int(self.expand_v * self.key_dim)


@dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    """Gated DeltaNet: DeltaNet plus a Mamba2-style decay ``g = -exp(A_log) softplus(W_a x + dt_bias)``."""

    gated: ClassVar[bool] = True

    expand_v: float = 2.0  # GDN doubles the value width (FLA default)
    output_gate: bool = True  # GDN's output gate (GDN Table S.1: crucial)
    a_init_max: float = 16.0  # A ~ U(0, a_init_max), A_log = log A (Mamba2 init)
    dt_min: float = 0.001  # dt ~ log-uniform in [dt_min, dt_max] at init; dt_bias = softplus^{-1}(dt)
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # lower clamp of the initial dt

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.a_init_max > 0:
            raise ConfigError(f"model.a_init_max must be > 0, got {self.a_init_max}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"need 0 < model.dt_min <= model.dt_max, got {self.dt_min} and {self.dt_max}")
        if not self.dt_init_floor > 0:
            raise ConfigError(f"model.dt_init_floor must be > 0, got {self.dt_init_floor}")


@dataclass
class DeltaNetLayerState:
    """Decoding state of one layer: the memory [B, H, K, V] (fp32) and the short conv's last inputs."""

    memory: torch.Tensor
    conv: torch.Tensor | None  # [B, conv_size - 1, channels]; None without a short conv


@dataclass
class DeltaNetState:
    """Decoding state of a DeltaNet: constant-size per layer, however long the context."""

    layers: list[DeltaNetLayerState]
    length: int = 0  # tokens processed so far

    @property
    def batch_size(self) -> int:
        return self.layers[0].memory.shape[0]


class DeltaNetMixer(nn.Module):
    """The (gated) delta-rule token mixer: ``x [B, T, d] -> [B, T, d]``."""

    def __init__(self, cfg: DeltaNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, K, V = cfg.n_heads, cfg.key_dim, cfg.value_dim
        self.n_heads, self.key_dim, self.value_dim = H, K, V
        self.qkv = nn.Linear(cfg.d_model, H * (2 * K + V), bias=False)
        self.conv = ShortConv(H * (2 * K + V), cfg.conv_size) if cfg.conv_size > 0 else None
        self.b_proj = nn.Linear(cfg.d_model, H, bias=False)
        if cfg.gated:
            self.a_proj = nn.Linear(cfg.d_model, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H))
            self.dt_bias = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(cfg.d_model, H * V, bias=False) if cfg.output_gate else None
        self.o_norm = (GatedRMSNorm if cfg.output_gate else RMSNorm)(V, cfg.norm_eps)
        self.o_proj = nn.Linear(H * V, cfg.d_model, bias=False)  # residual output projection

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.qkv, self.b_proj, self.g_proj, getattr(self, "a_proj", None)):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        if self.conv is not None:
            self.conv.reset_parameters()
        self.o_norm.reset_parameters()
        if self.cfg.gated:  # Mamba2's decay init, as in FLA's GatedDeltaNet; no weight decay on either (1-d)
            cfg = self.cfg
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, cfg.a_init_max).log())
            log_dt = torch.rand_like(self.dt_bias) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
            dt = (log_dt + math.log(cfg.dt_min)).exp().clamp(min=cfg.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def forward(self, x: torch.Tensor, state: DeltaNetLayerState | None = None) -> torch.Tensor:
        """x [B, T, d] -> [B, T, d]. With ``state``, x continues the sequence it holds, and it is updated in place."""
        B, T, _ = x.shape
        H, K, V = self.n_heads, self.key_dim, self.value_dim
        qkv = self.qkv(x)  # [B, T, H (2K + V)]
        if self.conv is None:
            qkv = F.silu(qkv)
        else:
            qkv, conv_cache = self.conv(qkv, None if state is None else state.conv)
        q, k, v = qkv.split([H * K, H * K, H * V], dim=-1)
        # CUDA autocast computes the norm in fp32, which would promote q and k: keep them in the projection's dtype
        q = F.normalize(q.view(B, T, H, K), dim=-1, eps=1e-6).to(qkv.dtype)
        k = F.normalize(k.view(B, T, H, K), dim=-1, eps=1e-6).to(qkv.dtype)
        v = v.view(B, T, H, V)
        acc = torch.promote_types(x.dtype, torch.float32)  # gates in at least fp32 (fp64 stays fp64)
        beta = torch.sigmoid(self.b_proj(x).to(acc))  # [B, T, H]
        if self.cfg.allow_neg_eigval:
            beta = 2 * beta
        g = None
        if self.cfg.gated:  # log decay, <= 0: g = -exp(A_log) softplus(W_a x + dt_bias)
            g = -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
        o, memory = gated_delta_rule(
            q,
            k,
            v,
            beta,
            g,  # the gates stay in >= fp32 under autocast: the op accumulates in fp32 anyway
            initial_state=None if state is None else state.memory,
            output_final_state=state is not None,
            chunk_size=self.cfg.chunk_size,
            backend=self.cfg.kernel_backend,
        )
        if state is not None:
            state.memory = memory
            state.conv = None if self.conv is None else conv_cache
        if self.g_proj is None:
            o = self.o_norm(o)
        else:
            o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))

    def new_state(self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype) -> DeltaNetLayerState:
        memory = torch.zeros(
            batch_size,
            self.n_heads,
            self.key_dim,
            self.value_dim,
            device=device,
            dtype=torch.promote_types(dtype, torch.float32),
        )
        conv = None
        if self.conv is not None:
            conv = torch.zeros(batch_size, self.conv.width - 1, self.qkv.out_features, device=device, dtype=dtype)
        return DeltaNetLayerState(memory, conv)

    def flops_per_token(self, seq_len: int) -> int:
        """Approximate training FLOPs per token of the chunked delta rule beyond the projections, per head: forward
        ``C (5K + 3V)`` for K K^T, Q K^T, the triangular solve and the intra-chunk product, plus ``6 K V`` for the
        state products (W S, Q S, K^T U); x3 with backward. C = min(chunk_size, seq_len)."""
        C, K, V = min(self.cfg.chunk_size, seq_len), self.key_dim, self.value_dim
        return 3 * self.n_heads * (C * (5 * K + 3 * V) + 6 * K * V)


class DeltaNet(DecoderLM):
    """DeltaNet / Gated DeltaNet language model (which one follows the config class)."""

    recurrent = True

    def __init__(self, cfg: DeltaNetConfig) -> None:
        super().__init__(cfg, lambda _: DeltaNetMixer(cfg))

    def levels(self) -> list[Level]:
        """The per-token memory (in-context, chunk 1: the kernel's tiling is not a level) and the weights."""
        rule = "gated delta rule (decay, then one GD step)" if self.cfg.gated else "delta rule (one GD step)"
        memory = Level(
            name="memory",
            chunk_size=1,
            scope="in_context",
            update=rule,
            objective="||S^T k_t - v_t||^2 per head",
        )
        return [memory, self.weights_level()]

    def init_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DeltaNetState:
        """Empty memories for ``batch_size`` sequences. ``max_len`` is accepted for the decoding protocol and not
        needed: the state does not grow with the context."""
        device, dtype = self._state_placement(batch_size, device, dtype)
        return DeltaNetState([block.mixer.new_state(batch_size, device, dtype) for block in self.layers])

    def step(self, input_ids: torch.Tensor, state: DeltaNetState) -> tuple[torch.Tensor, DeltaNetState]:
        """Process ``input_ids`` [B, t], the t tokens following those ``state`` has seen (t > 1 for a prompt);
        return their logits [B, t, V] and the state (updated in place). O(1) memory and time per token."""
        return self._step_layers(input_ids, state)


# Sizes mirror Transformer++ (same width and depth: a DeltaNet layer has the same 4 d^2 + MLP parameters as an
# attention layer), with head width 128 (GDN Table S.1's best trade-off) from 340m up. Gated DeltaNet follows FLA:
# n_heads * head_dim = 0.75 d and expand_v 2 give a 6 d^2 mixer, so the depth is lowered to land near the nominal
# size (1.3b is FLA's GatedDeltaNet default: 21 layers of 2048 with 6 heads of 256); tiny keeps 4 layers.
# Parameter counts with vocab_size=32000 and untied embeddings (tiny: with the 257-id byte tokenizer):
#   deltanet        tiny 3,361,792   340m 344,301,312   760m 778,744,320   1.3b 1,346,802,688
#   gated_deltanet  tiny 3,888,408   340m 346,214,372   760m 759,896,936   1.3b 1,370,833,660
DELTANET_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4),
    "340m": dict(d_model=1024, n_layers=22, n_heads=8),
    "760m": dict(d_model=1536, n_layers=24, n_heads=12),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
}
GATED_DELTANET_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=3, head_dim=64),
    "340m": dict(d_model=1024, n_layers=19, n_heads=6, head_dim=128),
    "760m": dict(d_model=1536, n_layers=20, n_heads=9, head_dim=128),
    "1.3b": dict(d_model=2048, n_layers=21, n_heads=6, head_dim=256),
}

SPECS = [
    ModelSpec("deltanet", DeltaNetConfig, DeltaNet, DELTANET_PRESETS),
    ModelSpec("gated_deltanet", GatedDeltaNetConfig, DeltaNet, GATED_DELTANET_PRESETS),
]
