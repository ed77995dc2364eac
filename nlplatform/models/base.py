"""What every decoder-only family shares: the size fields, the Llama-style block stack and the accounting.

A family supplies its token mixer (attention, a delta-rule memory, ...) and its levels; ``DecoderLM`` builds
``embedding -> n_layers x [x + mixer(norm(x)), x + swiglu(norm(x))] -> RMSNorm -> LM head`` around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.config import ModelConfig
from nlplatform.errors import ConfigError
from nlplatform.layers import RMSNorm, SwiGLU
from nlplatform.levels import Level
from nlplatform.validate import positive


def flush_denormals() -> None:
    """Flush subnormal floats to zero, as GPUs do. On CPUs they are up to 100x slower, and in-context memories make
    them (tiny residuals times decays like 0.5^63): a HOPE training step on real text took 80 s instead of 2 s. The
    setting is per thread and inherited by threads created later, so entry points call this before any torch work
    (training, checkpoint loading, benchmarks); building a model calls it too. No result that matters changes."""
    torch.set_flush_denormal(True)


def check_kernel_backend(backend: str, available: tuple[str, ...], op: str) -> None:
    """``model.kernel_backend`` must be ``auto`` or a backend the family's op has in this install."""
    if backend != "auto" and backend not in available:
        raise ConfigError(
            f"model.kernel_backend={backend!r}: the {op} has no such backend in this version; "
            f"available: auto, {', '.join(available)}"
        )


@dataclass(frozen=True)
class ModelSpec:
    """A registered family: its config dataclass, its module (built as ``model_cls(config)``) and named presets."""

    name: str
    config_cls: type[ModelConfig]
    model_cls: type[nn.Module]
    presets: dict[str, dict[str, Any]]
    # What a checkpoint's weights compute: raised whenever the family's math changes under the same config, so a
    # checkpoint trained under the old rule is refused instead of silently run under the new one. Checkpoints record
    # it as ``model_format``; those from before it existed are format 1.
    format_version: int = 1
    format_change: str = ""  # what the current format changed, for the refusal message


@dataclass
class DecoderConfig(ModelConfig):
    """Sizes shared by the block stack of every family; the defaults are the ``tiny`` presets'."""

    d_model: int = 256  # residual stream width
    n_layers: int = 4  # number of mixer + MLP blocks
    ffn_hidden: int | None = None  # SwiGLU hidden width; None = 8/3 * d_model rounded up to multiple_of
    multiple_of: int = 64  # rounding of the default ffn_hidden, for matmul-friendly shapes
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the token embedding with the LM head (saves vocab_size * d_model params)
    init_std: float = 0.02  # std of the normal init of embeddings and projections

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(
            "model",
            d_model=self.d_model,
            n_layers=self.n_layers,
            ffn_hidden=self.ffn_hidden,
            multiple_of=self.multiple_of,
        )
        for key in ("norm_eps", "init_std"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"model.{key} must be > 0, got {getattr(self, key)}")

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width: ``ffn_hidden``, or 8/3 * d_model (same parameters as a 4x GELU MLP) rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return self.multiple_of * math.ceil(8 * self.d_model / 3 / self.multiple_of)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.hidden_dim)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer.init_weights(std, out_std)
        nn.init.normal_(self.mlp.w1.weight, std=std)
        nn.init.normal_(self.mlp.w3.weight, std=std)
        nn.init.normal_(self.mlp.w2.weight, std=out_std)
        self.mixer_norm.reset_parameters()
        self.mlp_norm.reset_parameters()

    def forward(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), state)
        return x + self.mlp(self.mlp_norm(x))


class DecoderLM(nn.Module):
    """Decoder-only language model around a family's mixer; ``forward(input_ids [B, T]) -> logits [B, T, vocab]``.

    A mixer is an ``nn.Module`` with ``forward(x [B, T, d], state) -> [B, T, d]`` (``state`` is its per-layer
    decoding state or ``None``), ``init_weights(std, out_std)`` and ``flops_per_token(seq_len)`` (its training FLOPs
    per token that are not parameter matmuls).
    """

    # True for families whose decoding state has a constant size (a recurrent memory, no KV cache): they can read a
    # context of any length by carrying the state, which evaluation uses for long documents.
    recurrent: ClassVar[bool] = False

    def __init__(
        self,
        cfg: DecoderConfig,
        make_mixer: Callable[[int], nn.Module] | None = None,
        make_block: Callable[[int], nn.Module] | None = None,
    ) -> None:
        """Layer i is ``Block(cfg, make_mixer(i))``, or ``make_block(i)`` for families with their own block (any
        module with ``mixer`` and ``init_weights(std, out_std)``)."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ConfigError("model.vocab_size is unset: set it, or let the training data fill it from the tokenizer")
        flush_denormals()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if make_block is None:
            assert make_mixer is not None, "give make_mixer or make_block"
            make_block = lambda i: Block(cfg, make_mixer(i))  # noqa: E731
        self.layers = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))
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
        """Normal(0, init_std) for embeddings and projections; residual output projections (the mixer's, MLP ``w2``)
        scaled by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth; norms 1. Call
        after ``to_empty`` when the model was built on the meta device."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, std=std)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()

    def _run(self, input_ids: torch.Tensor, states: Sequence[Any] | None) -> torch.Tensor:
        x = self.tok_emb(input_ids)  # [B, T, d]
        for i, block in enumerate(self.layers):
            x = block(x, None if states is None else states[i])
        return F.linear(self.norm(x), self.output_weight)  # [B, T, V]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (any T >= 1) -> logits [B, T, vocab_size]."""
        return self._run(input_ids, None)

    # ------------------------------------------------------------------------------------- decoding helpers

    def _state_placement(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device | str, torch.dtype]:
        """Checks a decoding batch size and fills device and dtype from the weights where not given."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        weight = self.tok_emb.weight
        return (weight.device if device is None else device), (weight.dtype if dtype is None else dtype)

    def _step_layers(self, input_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """``step`` for states with per-layer ``layers``, a ``batch_size`` and a ``length`` (updated in place)."""
        B, t = input_ids.shape
        if B != state.batch_size:
            raise ValueError(f"state was made for batch size {state.batch_size}, got input of batch size {B}")
        logits = self._run(input_ids, state.layers)
        state.length += t
        return logits, state

    # ------------------------------------------------------------------------------------- accounting

    def weights_level(self) -> Level:
        """The persistent level every family has: all parameters, updated by the outer optimizer at every step."""
        return Level(
            name="weights",
            chunk_size=None,
            scope="persistent",
            params=list(self.parameters()),  # parameters() yields a shared tensor once
            update="outer optimizer",
            objective="next-token loss",
        )

    def levels(self) -> list[Level]:
        return [self.weights_level()]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; ``exclude_embeddings`` leaves out the token embedding table (a lookup, not a matmul).
        An untied LM head is counted as non-embedding: it is a matmul like any other projection."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_emb.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), for MFU: ``6 N`` plus the mixers' own term.

        N is the non-embedding parameter count plus the LM head when tied (its matmul is paid either way); the
        mixer term is what is not a parameter matmul (attention scores, the delta rule's chunk products).
        """
        n = self.num_params(exclude_embeddings=True)
        if self.lm_head is None:
            n += self.tok_emb.weight.numel()
        return 6 * n + sum(int(block.mixer.flops_per_token(seq_len)) for block in self.layers)
