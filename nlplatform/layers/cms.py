"""Continuum Memory System (CMS; arXiv §7.1, Eq. 70-74): a chain of MLP blocks, each updated at its own frequency.

Level l is a SwiGLU MLP with chunk size ``C_l`` tokens. Its parameters change only every ``C_l`` tokens, by the
summed gradients of the next-token loss over the chunk (Eq. 71): every token of a chunk sees the same weights.

- **In-context** levels (``C_l`` below the training window) hold per-sequence fast weights: the parameters are the
  meta-learned initial state ``W_0`` and, inside the forward pass, each sequence's weights move by
  ``-lr * sum_t x_t^T g_t`` at every chunk boundary, where ``x_t`` is a matrix's input and ``g_t`` the gradient of the
  chunk's next-token loss with respect to its output. The model (``models/hope.py``) runs the sequence chunk by chunk,
  takes those gradients and hands them to ``learn``.
- **Persistent** levels (larger chunks) are ordinary parameters that the outer optimizer steps every
  ``C_l / tokens_per_step`` optimizer steps (``nlplatform.levels.LevelScheduler``).

The fast weights are never materialised per sequence unless that is smaller: a level's state keeps the factors
``(x_t, g_t)`` of the tokens applied so far (the dual form of test-time training) and computes
``x W = x W_0 - lr * (x X^T) G``, so its memory grows like an activation cache, not like the weights. When the cache
holds more numbers than the dense per-sequence delta ``X^T G`` would, it is folded into that delta (exact).

Wiring (``variant``):
- ``sequential`` (Eq. 73): ``h <- h + MLP_l(norm_l(h))`` for each level in order;
- ``nested`` (Eq. 72): sequential, and a level's initial state is itself a fast weight of its parent (the next slower
  in-context level, chunk ``C_parent``): at every parent boundary the parent moves the child's initial state by its
  own inner learning rate times the child's summed inner gradients over the parent's chunk (first-order
  meta-learning, as Eq. 72's argmin read by one gradient step), and the child restarts from that learned state.
- ``independent`` (Eq. 74): the levels read the same normalised input in parallel and a learnable weighted sum
  aggregates them: ``h + sum_l a_l MLP_l(norm(h))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from nlplatform.layers.mlp import SwiGLU
from nlplatform.layers.norm import RMSNorm

CMS_VARIANTS = ("sequential", "nested", "independent")


@dataclass(frozen=True)
class Factors:
    """The per-token factors of a SwiGLU's summed gradient: inputs of ``w1``/``w3`` (``x``) and of ``w2`` (``h``),
    and the loss gradients at the outputs of ``w1``, ``w3`` and ``w2`` (``g1``, ``g3``, ``gy``); each [B, N, .]."""

    x: torch.Tensor
    g1: torch.Tensor
    g3: torch.Tensor
    h: torch.Tensor
    gy: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.x.shape[1]

    def cat(self, other: Factors | None) -> Factors:
        if other is None:
            return self
        return Factors(*(torch.cat([a, b], dim=1) for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.g1, self.g3, self.h, self.gy)


@dataclass(frozen=True)
class Tap:
    """What a forward pass of an in-context level records for its inner gradient: the inputs and outputs of its three
    matrices over one chunk (the outputs are the tensors the next-token loss is differentiated against), and the
    loss gradients gathered at those outputs so far (None before the first)."""

    level: int
    x: torch.Tensor
    z1: torch.Tensor
    z3: torch.Tensor
    h: torch.Tensor
    zy: torch.Tensor
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def outputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.z1, self.z3, self.zy)

    def add_grads(self, grads) -> Tap:
        if self.grads is not None:
            grads = tuple(a + b for a, b in zip(self.grads, grads))
        return replace(self, grads=tuple(grads))

    def factors(self, detach: bool) -> Factors:
        assert self.grads is not None
        f = Factors(self.x, self.grads[0], self.grads[1], self.h, self.grads[2])
        return Factors(*(t.detach() for t in f.astuple())) if detach else f


@dataclass(frozen=True)
class FastState:
    """One sequence batch's change to an in-context level since its initial state.

    ``applied`` are the factors of the updates already made (read in dual form), ``dense`` the part folded into
    per-sequence deltas (w1, w3, w2 as [B, in, out]), ``pending`` the taps of the level's open chunk: still part of
    the graph, so the loss of every later token of the chunk reaches them (the chunk's weights are shared by all its
    tokens, Eq. 71), and applied at the chunk's boundary. Immutable: updates return a new state."""

    applied: Factors | None = None
    dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    pending: tuple[Tap, ...] = ()
    # nested CMS: the change the parent level has made to this level's initial state (a FastState without pending
    # taps, its gradient factors already scaled to this level's learning rate); read together with the own change
    base: FastState | None = None

    def detach(self) -> FastState:
        assert not self.pending, "detach a fast state only at its chunk boundary"
        applied = None if self.applied is None else Factors(*(t.detach() for t in self.applied.astuple()))
        dense = None if self.dense is None else tuple(t.detach() for t in self.dense)
        return FastState(applied, dense, base=None if self.base is None else self.base.detach())

    def reading(self) -> tuple[Factors | None, tuple[torch.Tensor, ...] | None]:
        """The factors and dense deltas a read goes through: the own change plus, for nested CMS, the base."""
        if self.base is None:
            return self.applied, self.dense
        applied = self.applied if self.base.applied is None else self.base.applied.cat(self.applied)
        if self.dense is None or self.base.dense is None:
            dense = self.dense if self.base.dense is None else self.base.dense
        else:
            dense = tuple(a + b for a, b in zip(self.base.dense, self.dense))
        return applied, dense

    def scaled(self, factor: torch.Tensor) -> FastState:
        """The same change times ``factor`` (the gradient factors and dense deltas scaled; no pending taps)."""
        assert not self.pending, "scale a fast state only at its chunk boundary"
        applied = None
        if self.applied is not None:
            a = self.applied
            applied = Factors(a.x, a.g1 * factor, a.g3 * factor, a.h, a.gy * factor)
        dense = None if self.dense is None else tuple(d * factor for d in self.dense)
        return FastState(applied, dense)

    def plus(self, other: FastState) -> FastState:
        """The sum of two changes (no pending taps)."""
        applied = other.applied if self.applied is None else self.applied.cat(other.applied)
        if self.dense is None or other.dense is None:
            dense = self.dense if other.dense is None else other.dense
        else:
            dense = tuple(a + b for a, b in zip(self.dense, other.dense))
        return FastState(applied, dense)


def _fast_linear(x: torch.Tensor, weight: torch.Tensor, lr: torch.Tensor, keys, grads, dense) -> torch.Tensor:
    """``x (W_0 + delta)`` with delta = dense - lr * keys^T grads, never forming the per-sequence delta from keys."""
    z = F.linear(x, weight)
    if dense is not None:
        z = z + x @ dense.to(x.dtype)
    if keys is not None:
        z = z - lr * ((x @ keys.transpose(1, 2).to(x.dtype)) @ grads.to(x.dtype))
    return z


class CMS(nn.Module):
    """``x [B, T, d] -> [B, T, d]``: the residual chain (or parallel set) of CMS levels.

    ``chunk_sizes`` lists the levels in the order they are applied; ``in_context[i]`` says whether level i holds fast
    weights. ``forward(x, states, taps)`` reads each in-context level through its state (None = the initial
    weights) and appends a ``Tap`` per in-context level to ``taps`` when given (the model differentiates the chunk
    loss against them and calls ``learn``).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        chunk_sizes: list[int],
        in_context: list[bool],
        variant: str = "sequential",
        inner_lr: float = 1e-3,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if variant not in CMS_VARIANTS:
            raise ValueError(f"CMS variant must be one of {CMS_VARIANTS}, got {variant!r}")
        self.chunk_sizes = list(chunk_sizes)
        self.in_context = list(in_context)
        self.variant = variant
        self.mlps = nn.ModuleList(SwiGLU(dim, hidden) for _ in chunk_sizes)
        n_norms = 1 if variant == "independent" else len(chunk_sizes)
        self.norms = nn.ModuleList(RMSNorm(dim, norm_eps) for _ in range(n_norms))
        # independent CMS: learnable aggregation weights a_l (Eq. 74's "Agg" as a weighted sum)
        self.agg = nn.Parameter(torch.ones(len(chunk_sizes))) if variant == "independent" else None
        # per in-context level, the inner learning rate of its fast weights, meta-learned in log space. It starts at
        # inner_lr * C_min / C_l: Eq. 71 applies the *sum* of a chunk's gradients, so a level with twice the chunk
        # takes half the rate per token and every level's step starts at the same size (the fastest at inner_lr)
        fast_chunks = [c for c, f in zip(self.chunk_sizes, in_context) if f]
        init = [math.log(inner_lr * min(fast_chunks) / c) for c in fast_chunks]
        self.log_inner_lr = nn.Parameter(torch.tensor(init)) if fast_chunks else None
        self._fast_index = {lv: i for i, lv in enumerate(i for i, c in enumerate(in_context) if c)}
        # nested CMS: each in-context level's parent is the next slower in-context level, whose fast weights include
        # the child's initial state (a persistent parent's context is the whole window: the child's initial state is
        # then its meta-learned parameters, as in the sequential variant)
        self.nested_parent: dict[int, int] = {}
        if variant == "nested":
            for lv, c in enumerate(self.chunk_sizes):
                slower = [j for j, p in enumerate(self.chunk_sizes) if self.in_context[j] and p > c]
                if self.in_context[lv] and slower:
                    self.nested_parent[lv] = min(slower, key=lambda j: self.chunk_sizes[j])

    @property
    def fast_levels(self) -> list[int]:
        return list(self._fast_index)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for mlp in self.mlps:
            nn.init.normal_(mlp.w1.weight, std=std)
            nn.init.normal_(mlp.w3.weight, std=std)
            nn.init.normal_(mlp.w2.weight, std=out_std)
        for norm in self.norms:
            norm.reset_parameters()
        if self.agg is not None:
            self.agg.fill_(1.0)

    def inner_lr(self, level: int) -> torch.Tensor:
        assert self.log_inner_lr is not None
        return self.log_inner_lr[self._fast_index[level]].exp()

    def _mlp(self, level: int, x: torch.Tensor, state: FastState | None, taps: list[Tap] | None) -> torch.Tensor:
        mlp = self.mlps[level]
        if not self.in_context[level]:
            return mlp(x)
        state = state or FastState()
        lr = self.inner_lr(level)
        a, dense = state.reading()
        d1, d3, d2 = dense if dense is not None else (None, None, None)
        z1 = _fast_linear(x, mlp.w1.weight, lr, *((a.x, a.g1) if a else (None, None)), d1)
        z3 = _fast_linear(x, mlp.w3.weight, lr, *((a.x, a.g3) if a else (None, None)), d3)
        h = F.silu(z1) * z3
        zy = _fast_linear(h, mlp.w2.weight, lr, *((a.h, a.gy) if a else (None, None)), d2)
        if taps is not None:
            taps.append(Tap(level, x, z1, z3, h, zy))
        return zy

    def forward(
        self, x: torch.Tensor, states: list[FastState | None] | None = None, taps: list[Tap] | None = None
    ) -> torch.Tensor:
        states = states or [None] * len(self.mlps)
        if self.variant == "independent":
            u = self.norms[0](x)
            return x + sum(self.agg[i] * self._mlp(i, u, states[i], taps) for i in range(len(self.mlps)))
        for i in range(len(self.mlps)):
            x = x + self._mlp(i, self.norms[i](x), states[i], taps)
        return x

    def record(self, states: list[FastState | None] | None, taps: list[Tap]) -> list[FastState | None]:
        """Add a chunk's taps to their levels' open chunks."""
        new = list(states or [None] * len(self.mlps))
        for tap in taps:
            st = new[tap.level] or FastState()
            new[tap.level] = replace(st, pending=(*st.pending, tap))
        return new

    def commit(self, states: list[FastState | None], tokens_seen: int, detach: bool) -> list[FastState | None]:
        """Apply the levels whose boundary ``tokens_seen`` reaches: the summed gradients of their chunk (Eq. 71), as
        factors of the taps' inputs and gathered gradients. ``detach`` is the first-order approximation: the outer
        gradient treats the change as a constant (it still reaches the inner learning rates); otherwise it flows
        through the inner gradients (second order). Nested CMS then, at each parent boundary, moves the child's
        initial state by the parent's inner learning rate times the child's summed inner gradients over the parent's
        chunk, and restarts the child from it (Eq. 72)."""
        new = list(states)
        for lv in self.fast_levels:
            st = new[lv]
            if st is None:
                continue
            if tokens_seen % self.chunk_sizes[lv] == 0 and st.pending:
                applied = st.applied
                for tap in st.pending:
                    f = tap.factors(detach)
                    applied = f if applied is None else applied.cat(f)
                st = replace(self._maybe_fold(lv, FastState(applied, st.dense)), base=st.base)
            parent = self.nested_parent.get(lv)
            if parent is not None and tokens_seen % self.chunk_sizes[parent] == 0:
                # the own change is -lr_child * sum of gradients; the parent's step on the initial state is
                # -lr_parent * the same sum: the own change scaled by lr_parent / lr_child
                learnt = FastState(st.applied, st.dense).scaled(self.inner_lr(parent) / self.inner_lr(lv))
                base = learnt if st.base is None else st.base.plus(learnt)
                st = FastState(base=self._maybe_fold(lv, base))
            new[lv] = st
        return new

    def _maybe_fold(self, level: int, st: FastState) -> FastState:
        """Fold the applied factors into dense per-sequence deltas once they hold more numbers than the deltas."""
        a = st.applied
        mlp = self.mlps[level]
        d, hid = mlp.w1.in_features, mlp.w1.out_features
        if a is None or a.tokens * (d + hid) <= d * hid:
            return st
        lr = self.inner_lr(level)
        delta = (
            -lr * a.x.transpose(1, 2) @ a.g1,
            -lr * a.x.transpose(1, 2) @ a.g3,
            -lr * a.h.transpose(1, 2) @ a.gy,
        )
        if st.dense is not None:
            delta = tuple(o + n for o, n in zip(st.dense, delta))
        return FastState(None, delta, st.pending, st.base)
