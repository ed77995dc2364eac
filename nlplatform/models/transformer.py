"""Transformer++: the Llama-style attention baseline.

Pre-norm blocks ``x + attn(norm(x))``, ``x + swiglu(norm(x))`` with RMSNorm, rotary position embeddings, no biases,
causal SDPA attention (optionally grouped-query), a final RMSNorm and an LM head, optionally tied to the token
embedding. Its only level is the weights, updated by the outer optimizer at every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.config import ModelConfig
from nlplatform.errors import ConfigError
from nlplatform.layers import Attention, KVCache, RMSNorm, SwiGLU
from nlplatform.levels import Level


@dataclass
class TransformerConfig(ModelConfig):
    """Sizes of a Transformer++; the defaults are the ``tiny`` preset."""

    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of attention + MLP blocks
    n_heads: int = 4  # query heads; head_dim = d_model / n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention (smaller KV cache); None = n_heads
    ffn_hidden: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to multiple_of
    multiple_of: int = 64  # rounding of the default ffn_hidden, for matmul-friendly shapes
    rope_theta: float = 10000.0  # RoPE base; larger values stretch the wavelengths for longer contexts
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the LM head (saves vocab_size * d_model params)
    init_std: float = 0.02  # std of the normal init of embeddings and projections

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "multiple_of"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{key} must be > 0, got {value}")
        for key in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, key)
            if not value > 0:
                raise ConfigError(f"model.{key} must be > 0, got {value}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(
                f"model.d_model / model.n_heads = {self.head_dim} must be even for rotary embeddings; "
                "change d_model or n_heads"
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width: ``ffn_hidden``, or 8/3 * d_model (same parameters as a 4x GELU MLP) rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(8 * self.d_model / 3 / self.multiple_of)


# Parameter counts with vocab_size=32000 and untied embeddings (tiny: with the 257-id byte tokenizer):
#   tiny 3,345,152   340m 343,847,936   760m 777,856,512   1.3b 1,345,423,360
# 340m has 22 layers rather than the usual 24 (which gives 369,148,928 params), so it lands near its nominal size.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4),
    "340m": dict(d_model=1024, n_layers=22, n_heads=16),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
}


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class TransformerState:
    """Decoding state of a Transformer: one preallocated KV cache per layer."""

    caches: list[KVCache]

    @property
    def length(self) -> int:
        """Tokens already processed (the position of the next token)."""
        return self.caches[0].length

    @property
    def max_len(self) -> int:
        return self.caches[0].max_len


class Transformer(nn.Module):
    """Llama-style decoder-only language model; ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it, or let the training data fill it from the tokenizer")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: the head reads tok_emb.weight directly (no second module holding the same Parameter), so the tie
        # survives meta-device construction followed by ``to_empty``, which re-creates each module's parameters.
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @property
    def output_weight(self) -> nn.Parameter:
        """The LM head matrix [vocab, d_model]: the token embedding when tied."""
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) for embeddings and projections; residual output projections (attention ``wo``, MLP
        ``w2``) scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth; norms 1.
        Call after ``to_empty`` when the model was built on the meta device."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            for lin in (block.attn.wq, block.attn.wk, block.attn.wv, block.mlp.w1, block.mlp.w3):
                nn.init.normal_(lin.weight, std=std)
            for lin in (block.attn.wo, block.mlp.w2):
                nn.init.normal_(lin.weight, std=out_std)
            block.attn_norm.reset_parameters()
            block.mlp_norm.reset_parameters()
        self.norm.reset_parameters()

    def _run(self, input_ids: torch.Tensor, caches: list[KVCache] | None) -> torch.Tensor:
        x = self.tok_emb(input_ids)  # [B, T, C]
        for i, block in enumerate(self.layers):
            x = block(x, None if caches is None else caches[i])
        return F.linear(self.norm(x), self.output_weight)  # [B, T, V]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (any T >= 1) -> logits [B, T, vocab_size]."""
        return self._run(input_ids, None)

    # ------------------------------------------------------------------------------------- decoding

    def init_state(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TransformerState:
        """Empty KV caches for ``batch_size`` sequences of up to ``max_len`` tokens (default: the weights' device
        and dtype)."""
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be > 0, got {batch_size} and {max_len}")
        weight = self.tok_emb.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        return TransformerState([block.attn.new_cache(batch_size, max_len, device, dtype) for block in self.layers])

    def step(self, input_ids: torch.Tensor, state: TransformerState) -> tuple[torch.Tensor, TransformerState]:
        """Process ``input_ids`` [B, t], the t tokens after the ``state.length`` already cached (t > 1 for a
        prompt); return their logits [B, t, V] and the state (updated in place)."""
        B, t = input_ids.shape
        cache = state.caches[0]
        if B != cache.k.shape[0]:
            raise ValueError(f"state was made for batch size {cache.k.shape[0]}, got input of batch size {B}")
        if state.length + t > state.max_len:
            raise ValueError(f"{state.length} cached + {t} new tokens exceed the state's max_len {state.max_len}")
        return self._run(input_ids, state.caches), state

    # ------------------------------------------------------------------------------------- accounting

    def levels(self) -> list[Level]:
        """One persistent level: every parameter, updated by the outer optimizer at every step."""
        return [
            Level(
                name="weights",
                chunk_size=None,
                scope="persistent",
                params=list(self.parameters()),  # parameters() yields a shared tensor once
                update="outer optimizer",
                objective="next-token loss",
            )
        ]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out the token embedding table (a lookup, not a matmul).
        An untied LM head is counted as non-embedding: it is a matmul like any other projection."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), for MFU: ``6 N + 12 L d T`` (PaLM, appendix B).

        N is the non-embedding parameter count plus the LM head when tied (its matmul is paid either way); the
        second term is the attention scores and weighted sum (QK^T and AV) at context length T, not halved for
        causality, the usual convention.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.lm_head is None:
            n += self.tok_emb.weight.numel()
        return 6 * n + 12 * self.cfg.n_layers * self.cfg.d_model * seq_len


CONFIG = TransformerConfig
MODEL = Transformer
