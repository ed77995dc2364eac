"""Transformer++: the Llama-style attention baseline of the Titans and Gated DeltaNet papers.

Pre-norm blocks ``x + attn(norm(x))``, ``x + swiglu(norm(x))`` with RMSNorm, rotary position embeddings, no biases,
causal SDPA attention (optionally grouped-query), a final RMSNorm and an LM head, optionally tied to the token
embedding. Its only level is the weights, updated by the outer optimizer at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nlplatform.errors import ConfigError
from nlplatform.layers import Attention, KVCache
from nlplatform.models.base import DecoderConfig, DecoderLM, ModelSpec
from nlplatform.validate import positive


@dataclass
class TransformerConfig(DecoderConfig):
    """Sizes of a Transformer++; the defaults are the ``tiny`` preset."""

    n_heads: int = 4  # query heads; head_dim = d_model / n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention (smaller KV cache); None = n_heads
    rope_theta: float = 10000.0  # RoPE base; larger values stretch the wavelengths for longer contexts

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("model", n_heads=self.n_heads, n_kv_heads=self.n_kv_heads)
        if not self.rope_theta > 0:
            raise ConfigError(f"model.rope_theta must be > 0, got {self.rope_theta}")
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


# Parameter counts with vocab_size=32000 and untied embeddings (tiny: with the 257-id byte tokenizer):
#   tiny 3,345,152   340m 343,847,936   760m 777,856,512   1.3b 1,345,423,360
# 340m has 22 layers rather than the usual 24 (which gives 369,148,928 params), so it lands near its nominal size.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4),
    "340m": dict(d_model=1024, n_layers=22, n_heads=16),
    "760m": dict(d_model=1536, n_layers=24, n_heads=16),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16),
}


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


class Transformer(DecoderLM):
    """Llama-style decoder-only language model; ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg, lambda _: Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta))

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
        return TransformerState([block.mixer.new_cache(batch_size, max_len, device, dtype) for block in self.layers])

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


SPECS = [ModelSpec("transformer", TransformerConfig, Transformer, PRESETS)]
