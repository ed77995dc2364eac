"""HOPE (arXiv §8.3, Eq. 94-97): self-modifying Titans followed by a Continuum Memory System, and Hope-Attention.

Block (pre-norm, the Titans / Transformer++ layout; the paper gives no HOPE block diagram): ``x + mixer(norm(x))`` then
the CMS chain ``x + MLP_l(norm_l(x))`` per level (``nlplatform.layers.cms``). The mixer is

- ``hope``: **self-modifying Titans** (Eq. 83-93; ``kernels.self_modifying``). Per head, residual 2-layer MLP
  memories ``M_k, M_v, M_eta, M_alpha`` generate the keys, values, inner learning rate and retention from the
  layer input, and ``M_memory`` is read with a static query ``q`` (the one non-adaptive projection, §8.1). Every memory
  is written by DGD with retention and a Titans momentum term towards its own self-generated target ``M(v)``;
  gradients are taken at the state of the last chunk boundary (§8.2), with one chunk size for the main memory
  (``memory_chunk_size``) and one for the others (``projection_chunk_size``). Inputs and queries pass a causal
  conv of width 4; q and k are L2-normalised; the output passes a per-head RMSNorm gated by ``silu(W_g x)``.
- ``attention``: **Hope-Attention**, global causal softmax attention in place of the self-modifying Titans.

In-context CMS levels learn from the next-token loss inside the forward pass (Eq. 71): the model runs the sequence in
chunks of the smallest in-context CMS chunk ``P``, carrying every state (memories, conv caches, attention keys and
values, fast weights); after each chunk it differentiates the chunk's summed next-token loss with respect to the
in-context levels' outputs and hands the gradients to the CMS, which applies them at each level's boundary. A chunk
is learnt from once the token after it is known, so generation with test-time learning equals the full forward.
Every token of a chunk sees the same fast weights, so each chunk is one parallel pass (not a token loop).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels.self_modifying import (
    AVAILABLE_BACKENDS,
    SelfModState,
    initial_self_mod_state,
    memory_names,
    self_modifying_titans,
)
from kernels.titans_memory import ACTIVATIONS
from nlplatform.errors import ConfigError
from nlplatform.layers import Attention, GatedRMSNorm, GrowingKVCache, RMSNorm, ShortConv
from nlplatform.layers.cms import CMS, CMS_VARIANTS, FastState
from nlplatform.levels import Level
from nlplatform.models.base import DecoderConfig, DecoderLM, ModelSpec, check_kernel_backend
from nlplatform.validate import one_of, positive

VARIANTS = ("hope", "attention")


@dataclass
class HopeConfig(DecoderConfig):
    """Sizes and switches of a HOPE model; the defaults are the ``tiny`` preset's. What the paper leaves open is
    filled with the defaults listed in docs/PAPER_COMPLIANCE.md."""

    variant: str = "hope"  # hope (self-modifying Titans -> CMS) | attention (Hope-Attention: softmax attention -> CMS)
    n_heads: int = 4  # heads of the self-modifying memories (and of attention in Hope-Attention)
    head_dim: int | None = None  # per-head width of the memories; None = d_model / n_heads
    memory_depth: int = 2  # layers of each residual memory MLP M(z) = z + MLP(z) (Eq. 89: 2)
    memory_expansion: int = 1  # hidden width of the memory MLPs = memory_expansion * head_dim (paper: unknown; small
    # memories with an expressive rule, large CMS: the split of capacity §8.3 describes)
    memory_activation: str = "gelu"  # the memories' non-linearity (paper: unknown)
    memory_chunk_size: int = 16  # chunk of M_memory: its gradients share the chunk-start state (§8.2; figure: 16)
    projection_chunk_size: int = 64  # chunk of M_k, M_v, M_eta, M_alpha (the paper's second chunk size; unknown)
    # upper bound of the inner learning rate eta_t = eta_max * sigmoid(.); 0.3 trains as well as 0.1 under the exact
    # rule (bench/results/hope-rails-*.md)
    eta_max: float = 0.3
    # clip each token's inner gradient per memory; None = plain DGD (the default: the clip never acted at 150 steps)
    memory_max_grad_norm: float | None = None
    # initial momentum decay of the memories (learned per head after), in (0, 1); 0.9 diverged at eta_max 0.3
    memory_momentum_init: float = 0.5
    conv_size: int = 4  # causal depthwise conv width on the memory inputs and queries (§8.3: 4); 0 = none
    # ablation switches (arXiv Table 6): each true value is HOPE as the paper describes it
    dgd: bool = True  # false = "w/o DGD": plain GD inner rule (no -eta M k k^T term)
    memory_momentum: bool = True  # false = "w/o momentum": no Titans momentum in the inner rule
    memory_retention: bool = True  # false = "w/o weight decay": retention alpha_t = 1
    adaptive_k: bool = True  # false = static k: a linear projection (a persistent weight) instead of M_k
    adaptive_v: bool = True  # false = static v: a linear projection instead of M_v
    # CMS: chunk sizes in tokens, in the order the levels are applied; a level below the training window is
    # in-context (fast weights), the others persistent (stepped every C / tokens_per_step optimizer steps).
    # [] = "w/o CMS": one plain MLP updated with the weights, as in a Transformer
    cms_chunk_sizes: list[int] = field(default_factory=lambda: [64, 2048, 8192])
    cms_variant: str = "sequential"  # sequential (Eq. 73) | nested (Eq. 72) | independent (Eq. 74)
    cms_hidden: int | None = None  # hidden width of each CMS MLP; None = the SwiGLU width split over the levels
    # initial inner learning rate of the fastest in-context CMS level; a level of chunk C starts at
    # cms_inner_lr * C_min / C (Eq. 71 sums C gradients); all are meta-learned after
    cms_inner_lr: float = 1e-3
    cms_second_order: bool = False  # backpropagate through the inner updates (true) or first-order (false)
    test_time_learning: bool = True  # in-context CMS levels learn inside forward; false freezes them (f = 0)
    # the training window (decides in-context vs persistent levels): derived from data.seq_len when a recipe is loaded,
    # never a recipe key (nlplatform.validate.DERIVED); set it directly only when building a model by hand
    context_len: int = field(default=256, metadata={"derived": "data.seq_len"})
    # ad-hoc level stacking (§7.3): a trained checkpoint whose layer-i MLP initialises every CMS level of layer i
    # (its other weights of the same name and shape are copied too); applied when a run starts
    stack_from: str | None = None

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
            projection_chunk_size=self.projection_chunk_size,
            eta_max=self.eta_max,
            memory_max_grad_norm=self.memory_max_grad_norm,
            cms_hidden=self.cms_hidden,
            cms_inner_lr=self.cms_inner_lr,
            context_len=self.context_len,
        )
        if self.memory_depth > 2:
            raise ConfigError(f"model.memory_depth must be 1 or 2 (Eq. 89 uses 2), got {self.memory_depth}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads}), "
                "or set model.head_dim"
            )
        if self.variant == "attention" and (self.d_model // self.n_heads) % 2:
            raise ConfigError("model.d_model / model.n_heads must be even for rotary embeddings (Hope-Attention)")
        if not 0 < self.memory_momentum_init < 1:
            raise ConfigError(f"model.memory_momentum_init must be in (0, 1), got {self.memory_momentum_init}")
        if self.memory_activation not in ACTIVATIONS:
            raise ConfigError(f"model.memory_activation must be one of {ACTIVATIONS}, got {self.memory_activation!r}")
        if self.conv_size < 0:
            raise ConfigError(f"model.conv_size must be >= 0, got {self.conv_size}")
        a, b = sorted((self.memory_chunk_size, self.projection_chunk_size))
        if b % a:
            raise ConfigError(
                f"model.memory_chunk_size ({self.memory_chunk_size}) and model.projection_chunk_size "
                f"({self.projection_chunk_size}) must divide one another"
            )
        one_of("model", "cms_variant", self.cms_variant, CMS_VARIANTS)
        chunks = list(self.cms_chunk_sizes)
        if any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in chunks):
            raise ConfigError(f"model.cms_chunk_sizes must be positive token counts, got {chunks}")
        fast = sorted(c for c in chunks if c < self.context_len)
        for small, large in zip(fast, fast[1:]):
            if large % small:
                raise ConfigError(
                    f"model.cms_chunk_sizes: the in-context levels' chunks {fast} (those below the window "
                    f"{self.context_len}) must each divide the next larger one"
                )
        if fast and self.variant == "hope" and fast[0] % self.smt_period:
            raise ConfigError(
                f"model.cms_chunk_sizes: the smallest in-context chunk ({fast[0]}) must be a multiple of the "
                f"self-modifying memories' chunks ({self.memory_chunk_size}, {self.projection_chunk_size})"
            )

    @property
    def key_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def smt_period(self) -> int:
        """Tokens after which every self-modifying memory is at a chunk boundary."""
        return max(self.memory_chunk_size, self.projection_chunk_size)

    @property
    def cms_in_context(self) -> list[bool]:
        return [c < self.context_len for c in self.cms_chunk_sizes]

    @property
    def cms_width(self) -> int:
        if self.cms_hidden is not None:
            return self.cms_hidden
        n = max(1, len(self.cms_chunk_sizes))
        return self.multiple_of * math.ceil(self.hidden_dim / n / self.multiple_of)


# ------------------------------------------------------------------------------------------- the mixers


class SelfModifyingTitans(nn.Module):
    """``x [B, T, d] -> [B, T, d]`` with state ``(SelfModState, conv cache)``: the self-modifying Titans mixer."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, K = cfg.n_heads, cfg.key_dim
        self.n_heads, self.key_dim = H, K
        self.static = [name for name, adaptive in (("k", cfg.adaptive_k), ("v", cfg.adaptive_v)) if not adaptive]
        # memory inputs x~, queries q and, for the static ablations, k and v: linear -> conv(4) -> silu
        self.n_streams = 2 + len(self.static)
        self.in_proj = nn.Linear(cfg.d_model, self.n_streams * H * K, bias=False)
        self.conv = ShortConv(self.n_streams * H * K, cfg.conv_size) if cfg.conv_size > 0 else None
        self.names = memory_names(static_k=not cfg.adaptive_k, static_v=not cfg.adaptive_v)
        hidden = cfg.memory_expansion * K
        dims = [K, hidden, K] if cfg.memory_depth == 2 else [K, K]
        M = len(self.names)
        # the memories' initial states, meta-learned by the outer loop (§8.1): [memory, H, d_in, d_out] per layer
        self.memory_init = nn.ParameterList(nn.Parameter(torch.empty(M, H, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.gate_w = nn.Parameter(torch.empty(2, H, K))  # read-outs of M_eta, M_alpha to per-head scalars
        self.gate_b = nn.Parameter(torch.empty(2, H))
        self.momentum_logit = nn.Parameter(torch.empty(H)) if cfg.memory_momentum else None
        self.g_proj = nn.Linear(cfg.d_model, H * K, bias=False)
        self.o_norm = GatedRMSNorm(K, cfg.norm_eps)
        self.o_proj = nn.Linear(H * K, cfg.d_model, bias=False)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.g_proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
        last = len(self.memory_init) - 1
        for i, w in enumerate(self.memory_init):
            # residual memories start near the identity: the MLP's last layer small
            nn.init.normal_(w, std=(0.1 if i == last and last > 0 else 1.0) / math.sqrt(w.shape[-2]))
        nn.init.normal_(self.gate_w, std=1 / math.sqrt(self.key_dim))
        self.gate_b[0].zero_()  # eta_t starts around eta_max / 2
        self.gate_b[1].fill_(4.0)  # alpha_t starts around sigmoid(4) = 0.98: slow forgetting
        if self.momentum_logit is not None:
            # the momentum decay beta = sigmoid(logit) starts at memory_momentum_init (1 / (1 - beta) amplifies eta)
            self.momentum_logit.fill_(math.log(self.cfg.memory_momentum_init / (1 - self.cfg.memory_momentum_init)))
        if self.conv is not None:
            self.conv.reset_parameters()
        self.o_norm.reset_parameters()

    def flops_per_token(self, seq_len: int) -> int:
        """Memory FLOPs per token beyond the projections: per memory, head and layer (d_in x d_out) the reads at the
        snapshot, the inner gradient, the DGD term, the update and the exact read (~12 d_in d_out + 4 C (d_in +
        d_out)), x3 with backward."""
        C = min(self.cfg.memory_chunk_size, seq_len)
        K, hidden = self.key_dim, self.cfg.memory_expansion * self.key_dim
        dims = [K, hidden, K] if self.cfg.memory_depth == 2 else [K, K]
        per_layer = sum(12 * a * b + 4 * C * (a + b) for a, b in zip(dims[:-1], dims[1:]))
        return 3 * len(self.names) * self.n_heads * per_layer

    def forward(self, x: torch.Tensor, state: tuple[SelfModState, torch.Tensor | None] | None) -> tuple:
        B, T, _ = x.shape
        H, K, cfg = self.n_heads, self.key_dim, self.cfg
        memory, conv = (None, None) if state is None else state
        u = self.in_proj(x)
        if self.conv is None:
            u, conv = F.silu(u), None
        else:
            u, conv = self.conv(u, conv)
        streams = dict(zip(["x", "q", *self.static], u.view(B, T, self.n_streams, H, K).unbind(2)))
        memory_in = F.normalize(streams["x"], dim=-1, eps=1e-6)  # unit-norm inputs keep the memories' steps bounded
        q = F.normalize(streams["q"], dim=-1, eps=1e-6)
        static_k = F.normalize(streams["k"], dim=-1, eps=1e-6) if "k" in streams else None
        if memory is None:
            acc = torch.promote_types(x.dtype, torch.float32)
            memory = initial_self_mod_state(tuple(w.to(acc) for w in self.memory_init), B)
        decay = None if self.momentum_logit is None else torch.sigmoid(self.momentum_logit)
        o, memory = self_modifying_titans(
            memory_in,
            q,
            self.gate_w,
            self.gate_b,
            memory,
            static_k=static_k,
            static_v=streams.get("v"),
            momentum_decay=decay,
            chunk_size=cfg.projection_chunk_size,
            memory_chunk_size=cfg.memory_chunk_size,
            eta_max=cfg.eta_max,
            dgd=cfg.dgd,
            retention=cfg.memory_retention,
            activation=cfg.memory_activation,
            max_grad_norm=cfg.memory_max_grad_norm,
            backend=cfg.kernel_backend,
        )
        y = self.o_norm(o, self.g_proj(x).view(B, T, H, K))
        return self.o_proj(y.reshape(B, T, H * K)), (memory, conv)


class CausalAttention(nn.Module):
    """Hope-Attention's mixer: global causal softmax attention whose state is the keys and values so far."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.attn = Attention(cfg.d_model, cfg.n_heads)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn.init_weights(std, out_std)

    def flops_per_token(self, seq_len: int) -> int:
        return self.attn.flops_per_token(seq_len)

    def forward(self, x: torch.Tensor, state: GrowingKVCache | None) -> tuple[torch.Tensor, GrowingKVCache]:
        cache = GrowingKVCache() if state is None else state.copy()
        return self.attn(x, cache), cache


# ------------------------------------------------------------------------------------------- block and model


@dataclass
class BlockState:
    """One block's state after the tokens seen so far: its mixer's and its CMS fast weights (per level)."""

    mixer: Any = None
    cms: list[FastState | None] | None = None


class HopeBlock(nn.Module):
    """``x + mixer(norm(x))``, then the CMS chain (its own residuals and norms)."""

    def __init__(self, cfg: HopeConfig) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = SelfModifyingTitans(cfg) if cfg.variant == "hope" else CausalAttention(cfg)
        if cfg.cms_chunk_sizes:
            self.cms = CMS(
                cfg.d_model,
                cfg.cms_width,
                cfg.cms_chunk_sizes,
                cfg.cms_in_context,
                cfg.cms_variant,
                cfg.cms_inner_lr,
                cfg.norm_eps,
            )
        else:  # "w/o CMS": one MLP of the full width, updated with the weights
            self.cms = CMS(cfg.d_model, cfg.hidden_dim, [cfg.context_len], [False], "sequential", 1.0, cfg.norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        self.mixer_norm.reset_parameters()
        self.mixer.init_weights(std, out_std)
        self.cms.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, state: BlockState | None, taps: list | None) -> tuple[torch.Tensor, BlockState]:
        state = state or BlockState()
        h, mixer_state = self.mixer(self.mixer_norm(x), state.mixer)
        x = x + h
        return self.cms(x, state.cms, taps), BlockState(mixer_state, state.cms)


@dataclass
class HopeState:
    """Decoding state: every block's state at the last committed chunk boundary, and the tokens after it (recomputed
    from there at each step, so decoding equals the full forward)."""

    layers: list[BlockState | None]
    batch_size: int
    pending: torch.Tensor | None = None  # token ids after the committed boundary [B, n]
    length: int = 0  # tokens seen

    @property
    def committed(self) -> int:
        return self.length - (0 if self.pending is None else self.pending.shape[1])


def _detach_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (FastState, GrowingKVCache)):
        return x.detach()
    if isinstance(x, SelfModState):
        return SelfModState(*(_detach_tree(t) for t in x))
    if isinstance(x, BlockState):
        return BlockState(_detach_tree(x.mixer), _detach_tree(x.cms))
    if isinstance(x, (list, tuple)):
        return type(x)(_detach_tree(t) for t in x)
    return x


class Hope(DecoderLM):
    """HOPE / Hope-Attention language model; ``forward(input_ids [B, T]) -> logits [B, T, vocab]``."""

    def __init__(self, cfg: HopeConfig) -> None:
        if cfg.variant == "hope":
            check_kernel_backend(cfg.kernel_backend, AVAILABLE_BACKENDS, "self-modifying Titans memory")
        super().__init__(cfg, make_block=lambda _: HopeBlock(cfg))
        fast = [c for c, f in zip(cfg.cms_chunk_sizes, cfg.cms_in_context) if f]
        self.fast_period = min(fast) if fast else None  # P: the chunk the forward learns at
        self.slowest_fast_chunk = max(fast) if fast else None  # every in-context level is at a boundary here
        self.period = cfg.smt_period if cfg.variant == "hope" else 1  # commit granularity without learning
        self.test_time_learning = cfg.test_time_learning
        # HOPE's state is bounded (memories, conv caches, CMS fast weights folded once larger than dense deltas);
        # Hope-Attention keeps every key and value
        self.recurrent = cfg.variant == "hope"

    @property
    def learning(self) -> bool:
        """Whether the forward learns in context (in-context CMS levels exist and test-time learning is on)."""
        return self.fast_period is not None and self.test_time_learning

    def set_test_time_learning(self, on: bool) -> None:
        """Switch the in-context CMS levels' learning on or off (off: they keep their initial weights, f = 0)."""
        self.test_time_learning = bool(on)

    # ---------------------------------------------------------------------------------------------- forward

    def _chunk(self, ids: torch.Tensor, states: list[BlockState | None], taps: list[list] | None):
        x = self.tok_emb(ids)
        new = []
        for i, block in enumerate(self.layers):
            x, st = block(x, states[i], None if taps is None else taps[i])
            new.append(st)
        return F.linear(self.norm(x), self.output_weight), new

    def _learn(self, ids_next, logits, states: list[BlockState], taps, tokens_seen: int, second: bool):
        """One inner step after a chunk: its summed next-token loss, the loss's gradients at the outputs of every
        in-context level over the level's open chunk (this chunk and the earlier ones since its last boundary: they
        share its weights), and the CMS updates due once ``tokens_seen`` tokens are in (Eq. 71). ``second``: keep the
        inner gradients' graph so the outer gradient flows through them."""
        loss = F.cross_entropy(
            logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
            ids_next.flatten(),
            reduction="sum",
        )
        states = [BlockState(st.mixer, block.cms.record(st.cms, t)) for block, st, t in zip(self.layers, states, taps)]
        open_taps = [tap for st in states for fs in st.cms if fs is not None for tap in fs.pending]
        outputs = [z for tap in open_taps for z in tap.outputs]
        grads = torch.autograd.grad(loss, outputs, create_graph=second, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(z) if g is None else g for z, g in zip(outputs, grads)]  # no path to this loss
        it = iter(range(len(open_taps)))
        out = []
        for block, st in zip(self.layers, states):
            cms = []
            for fs in st.cms:
                if fs is not None:
                    fs = replace(
                        fs, pending=tuple(tap.add_grads(grads[3 * i : 3 * i + 3]) for tap, i in zip(fs.pending, it))
                    )
                cms.append(fs)
            out.append(BlockState(st.mixer, block.cms.commit(cms, tokens_seen, detach=not second)))
        return out

    def _process(self, ids: torch.Tensor, states: list[BlockState | None], offset: int, outer: bool):
        """Run ``ids`` [B, T], the tokens after the first ``offset`` ones that ``states`` hold: (logits [B, T, V],
        the states at the last committed boundary, tokens committed). A chunk is committed once it is complete and,
        when learning, the token after it is known (its last prediction's target). ``outer``: whether the caller
        differentiates the result (grad mode as the caller had it: the inner steps always run with autograd on, and
        without an outer backward each chunk's graph is dropped once no level has an open chunk)."""
        T = ids.shape[1]
        outs = []
        if not self.learning:
            done = (T // self.period) * self.period
            if done:
                logits, states = self._chunk(ids[:, :done], states, None)
                outs.append(logits)
            if done < T:
                outs.append(self._chunk(ids[:, done:], states, None)[0])
            return torch.cat(outs, dim=1), states, done
        P, done = self.fast_period, 0
        # second order keeps the inner gradients' graph even without an outer backward: a later chunk's inner gradient
        # then also flows through the earlier updates, so the forward is the same function with or without one
        second = self.cfg.cms_second_order
        # second order differentiates the inner backward again: attention must take SDPA's twice-differentiable path
        maths = sdpa_kernel(SDPBackend.MATH) if second else nullcontext()
        with torch.enable_grad(), maths:
            for s in range(0, T, P):
                e = min(s + P, T)
                if e == T:  # no token after this chunk yet: read it now, learn from it once the next token is in
                    logits = self._chunk(ids[:, s:e], states, None)[0]
                    outs.append(logits if outer else logits.detach())
                    break
                taps: list[list] = [[] for _ in self.layers]
                logits, new = self._chunk(ids[:, s:e], states, taps)
                states = self._learn(ids[:, s + 1 : e + 1], logits, new, taps, offset + e, second)
                if not outer:  # scoring / decoding: drop the graph once no level has an open chunk
                    logits = logits.detach()
                    if (offset + e) % self.slowest_fast_chunk == 0:
                        states = _detach_tree(states)
                outs.append(logits)
                done = e
        return torch.cat(outs, dim=1), states, done

    def _guarded(self):
        """In-context learning needs autograd: leave inference mode for it (the caller's outputs are unaffected).
        Leaving inference mode also turns grad mode on, so callers read ``torch.is_grad_enabled()`` before it."""
        return torch.inference_mode(False) if self.learning and torch.is_inference_mode_enabled() else nullcontext()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outer = torch.is_grad_enabled()
        with self._guarded():
            ids = input_ids.clone() if self.learning and input_ids.is_inference() else input_ids
            return self._process(ids, [None] * len(self.layers), 0, outer)[0]

    # --------------------------------------------------------------------------------------------- decoding

    def init_state(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> HopeState:
        """A fresh decoding state (states are created on first use; ``max_len`` is not needed)."""
        self._state_placement(batch_size, device, dtype)
        return HopeState([None] * len(self.layers), batch_size)

    def step(self, input_ids: torch.Tensor, state: HopeState) -> tuple[torch.Tensor, HopeState]:
        """Process ``input_ids`` [B, t] after the tokens ``state`` has seen; return logits [B, t, V]. With test-time
        learning on, the in-context levels learn from every chunk as soon as the token after it arrives."""
        B, t = input_ids.shape
        if B != state.batch_size:
            raise ValueError(f"state was made for batch size {state.batch_size}, got input of batch size {B}")
        outer = torch.is_grad_enabled()
        with self._guarded():
            ids = input_ids.clone() if self.learning and input_ids.is_inference() else input_ids
            xs = ids if state.pending is None else torch.cat([state.pending, ids], dim=1)
            logits, state.layers, done = self._process(xs, state.layers, state.committed, outer)
        state.length += t
        state.pending = xs[:, done:] if done < xs.shape[1] else None
        return logits[:, -t:], state

    # ------------------------------------------------------------------------------------------ level stacking

    @torch.no_grad()
    def stack_levels(self, source: dict[str, torch.Tensor]) -> list[str]:
        """Ad-hoc level stacking (arXiv §7.3): start every CMS level of layer i from the source model's layer-i MLP
        (a Transformer++ ``mlp`` and ``mlp_norm``, or a CMS level of a HOPE model), and copy every other parameter
        of the same name and shape (embeddings, head, norms, Hope-Attention's attention from a Transformer++). With
        the inner learning rates near 0 the stacked model computes what the source did. Returns the copied names."""
        mapping: dict[str, str] = {}
        for i, block in enumerate(self.layers):
            for lv in range(len(block.cms.mlps)):
                for w in ("w1", "w2", "w3"):
                    mapping[f"layers.{i}.cms.mlps.{lv}.{w}.weight"] = f"layers.{i}.mlp.{w}.weight"
            for n in range(len(block.cms.norms)):
                mapping[f"layers.{i}.cms.norms.{n}.weight"] = f"layers.{i}.mlp_norm.weight"
            if self.cfg.variant == "attention":
                for w in ("wq", "wk", "wv", "wo"):
                    mapping[f"layers.{i}.mixer.attn.{w}.weight"] = f"layers.{i}.mixer.{w}.weight"
        copied = []
        for name, param in self.named_parameters():
            src = name if name in source else mapping.get(name)
            if src is None or src not in source:
                continue
            if source[src].shape != param.shape:
                if name.startswith("layers.") and ".cms.mlps." in name:
                    raise ConfigError(
                        f"model.stack_from: the source's {src} is {tuple(source[src].shape)} but {name} is "
                        f"{tuple(param.shape)}; set model.cms_hidden (and d_model) to the source's MLP width"
                    )
                continue
            param.copy_(source[src].to(param.dtype))
            copied.append(name)
        if not any(".cms.mlps." in n for n in copied):
            raise ConfigError(
                "model.stack_from: the source checkpoint has no MLP weights this model's CMS can start from"
            )
        return copied

    # ------------------------------------------------------------------------------------------- accounting

    def levels(self) -> list[Level]:
        cfg = self.cfg
        levels: list[Level] = []
        if cfg.variant == "hope":
            rule = (
                "exact DGD on the running weights + retention + momentum, gradients at the chunk-start snapshot "
                "(Eq. 88-91)"
            )
            levels.append(
                Level(
                    "memory",
                    cfg.memory_chunk_size,
                    "in_context",
                    update=rule,
                    objective="||M(k_t) - M(v_t)||^2 per head (self-generated target)",
                )
            )
            gens = ", ".join(f"M_{n}" for n in self.layers[0].mixer.names[1:])
            levels.append(
                Level(
                    "projections",
                    cfg.projection_chunk_size,
                    "in_context",
                    update=f"{rule}: {gens}",
                    objective="||M(k_t) - M(v_t)||^2 per head (self-generated target)",
                )
            )
        owned: set[int] = set()
        if cfg.cms_chunk_sizes:
            for i, (c, fast) in enumerate(zip(cfg.cms_chunk_sizes, cfg.cms_in_context)):
                if fast:
                    levels.append(
                        Level(
                            f"cms.{i}",
                            c,
                            "in_context",
                            update="GD on the chunk's summed next-token gradients (Eq. 71), dual form",
                        )
                    )
                    continue
                params = []
                for block in self.layers:
                    params += list(block.cms.mlps[i].parameters())
                    if cfg.cms_variant != "independent":
                        params += list(block.cms.norms[i].parameters())
                owned |= {id(p) for p in params}
                levels.append(
                    Level(
                        f"cms.{i}",
                        c,
                        "persistent",
                        params=params,
                        update="outer optimizer, summed gradients of the steps in between (Eq. 71)",
                    )
                )
        rest = [p for p in self.parameters() if id(p) not in owned]
        levels.append(Level("weights", None, "persistent", params=rest, update="outer optimizer"))
        return levels


# Tiny: 4 layers of 256 (per head residual memories 64 -> 64 -> 64). Paper sizes follow Titans' presets (the paper
# gives no HOPE architecture): CMS in-context at 512 tokens, persistent levels at 1M and 16M tokens (the
# backbone figure's frequencies), memory chunks 16 and 64, a 4K window.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=256, n_layers=4, n_heads=4),
    "340m": dict(d_model=1024, n_layers=20, n_heads=8, context_len=4096, cms_chunk_sizes=[512, 1 << 20, 1 << 24]),
    "760m": dict(d_model=1536, n_layers=22, n_heads=12, context_len=4096, cms_chunk_sizes=[512, 1 << 20, 1 << 24]),
    "1.3b": dict(d_model=2048, n_layers=22, n_heads=16, context_len=4096, cms_chunk_sizes=[512, 1 << 20, 1 << 24]),
}

# Format 2: the chunked self-modifying memories compute Eq. 91 exactly (the DGD projection on the running weights);
# format 1 linearised it at the chunk start, so its weights were trained for another rule.
SPECS = [
    ModelSpec(
        "hope",
        HopeConfig,
        Hope,
        PRESETS,
        format_version=2,
        format_change="HOPE's chunked DGD is now the paper's exact rule (format 1 linearised it at each chunk start)",
    )
]
