"""Building blocks shared by every model family: RMSNorm, rotary embeddings, SwiGLU and causal attention."""

from nlplatform.layers.attention import Attention, KVCache
from nlplatform.layers.mlp import SwiGLU
from nlplatform.layers.norm import RMSNorm
from nlplatform.layers.rope import RotaryEmbedding, apply_rotary

__all__ = ["Attention", "KVCache", "RMSNorm", "RotaryEmbedding", "SwiGLU", "apply_rotary"]
