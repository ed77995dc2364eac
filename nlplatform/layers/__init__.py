"""Building blocks shared by the model families: norms, rotary embeddings, SwiGLU, causal attention, short conv."""

from nlplatform.layers.attention import Attention, GrowingKVCache, KVCache
from nlplatform.layers.conv import ShortConv
from nlplatform.layers.mlp import SwiGLU
from nlplatform.layers.norm import GatedRMSNorm, RMSNorm
from nlplatform.layers.rope import RotaryEmbedding, apply_rotary

__all__ = [
    "Attention",
    "GatedRMSNorm",
    "GrowingKVCache",
    "KVCache",
    "RMSNorm",
    "RotaryEmbedding",
    "ShortConv",
    "SwiGLU",
    "apply_rotary",
]
