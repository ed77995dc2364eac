"""Levels: the platform's spine (Nested Learning arXiv §3.2-3.3).

A model is a set of nested optimisation problems, each updated at its own frequency. Every model declares its
levels through ``model.levels()``; a level is a group of parameters or fast state with

- ``chunk_size`` C, in tokens: how many tokens it sees between two of its updates, and its only frequency setting.
  The frequency shown is derived as in the paper (arXiv §3.2-3.3, CMS §7.1): ``f = C_max / C`` within a model, so the
  slowest level has f = 1.
- ``scope``: ``in_context`` levels hold fast state updated inside ``forward`` and reset at every training window
  (C < data.seq_len); ``persistent`` levels are module parameters updated by the outer optimizer.
- an update rule and an objective (for persistent levels: the outer optimizer on the next-token loss).

A persistent level steps every ``max(1, round(C / T_step))`` optimizer steps, where ``T_step`` is the global number
of tokens per optimizer step (seq_len x batch x world size x accumulation). Between its steps the gradients of the
skipped steps are summed (arXiv Eq. 71 sums the chunk's errors), so at its step it applies the gradient of all the
C tokens it has seen. ``LevelScheduler`` does that bookkeeping without any training framework: it is called after
backward (and after the data-parallel all-reduce) and before the optimizer step.

Gradient clipping belongs to the same call: each step's gradient is clipped (one norm over every level's fresh
gradient) *before* a slow level holds its share back, and a released sum never enters a norm. Clipping after the
release would see the sum of a slow level's chunk in the global norm and shrink every other level's step on the step
it lands; clipped before, a level's release never changes another level's update, and the sum a slow level applies is
the sum of clipped per-step gradients (Eq. 71's sum of the chunk's errors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

Scope = Literal["in_context", "persistent"]


@dataclass
class Level:
    name: str  # unique within the model, shown in logs ("weights", "cms.2", "memory")
    chunk_size: int | None  # tokens per update; None = every outer optimizer step (C = T_step)
    scope: Scope  # in_context: fast state inside forward, reset per window; persistent: outer-loop parameters
    params: list[nn.Parameter] = field(default_factory=list, repr=False)  # parameters this level owns (may be empty)
    update: str = "outer optimizer"  # update rule, for display ("adamw", "delta rule", "DGD + decay")
    objective: str = "next-token loss"  # what the level minimises, for display

    def __post_init__(self) -> None:
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ValueError(f"level {self.name!r}: chunk_size must be > 0 tokens, got {self.chunk_size}")
        if self.scope not in ("in_context", "persistent"):
            raise ValueError(f"level {self.name!r}: scope must be 'in_context' or 'persistent', got {self.scope!r}")
        if self.scope == "in_context" and self.chunk_size is None:
            raise ValueError(f"level {self.name!r}: an in-context level needs a chunk size in tokens")

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)


def resolved_chunk(level: Level, tokens_per_step: int) -> int:
    """The level's chunk in tokens, with "every optimizer step" resolved to ``tokens_per_step``."""
    return tokens_per_step if level.chunk_size is None else level.chunk_size


def frequencies(levels: Sequence[Level], tokens_per_step: int) -> dict[str, float]:
    """``f = C_max / C`` for every level (arXiv §3.2-3.3): the slowest level has frequency 1."""
    chunks = {lv.name: resolved_chunk(lv, tokens_per_step) for lv in levels}
    c_max = max(chunks.values())
    return {name: c_max / c for name, c in chunks.items()}


def step_period(level: Level, tokens_per_step: int) -> int:
    """Optimizer steps between two updates of a persistent level: ``max(1, round(C / T_step))``."""
    return max(1, round(resolved_chunk(level, tokens_per_step) / tokens_per_step))


def check_levels(levels: Sequence[Level], module: nn.Module, seq_len: int) -> None:
    """Every trainable parameter belongs to exactly one level; names are unique; scopes match the window length."""
    names = [lv.name for lv in levels]
    if len(set(names)) != len(names):
        raise ValueError(f"level names must be unique, got {names}")
    owner: dict[int, str] = {}
    for lv in levels:
        for p in lv.params:
            if id(p) in owner:
                raise ValueError(f"a parameter belongs to both level {owner[id(p)]!r} and level {lv.name!r}")
            owner[id(p)] = lv.name
        if lv.scope == "in_context" and lv.chunk_size is not None and lv.chunk_size >= seq_len:
            raise ValueError(
                f"level {lv.name!r} is in-context with chunk {lv.chunk_size} >= data.seq_len {seq_len}: it would "
                "never update inside a window; lower its chunk size or raise data.seq_len"
            )
    orphans = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in owner]
    if orphans:
        raise ValueError(f"parameters not declared in any level: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}")


class LevelScheduler:
    """Steps each persistent level at its own period, summing the gradients of the steps in between.

    Call ``before_optimizer_step(step, max_grad_norm)`` once per optimizer step, after the gradients are final
    (accumulated and all-reduced) and before the optimizer runs, with no other clipping; ``step`` is the number of
    optimizer steps already taken. The step's gradients are first clipped together to ``max_grad_norm``. For a level
    that is not due, its gradients are then added to a per-level buffer and its ``.grad`` is set to ``None``, so the
    optimizer leaves it (and its optimizer state) untouched. When it is due, the buffer is added back into ``.grad``.
    The buffers are part of ``state_dict`` so an interrupted run resumes mid-chunk exactly.
    """

    def __init__(self, levels: Sequence[Level], tokens_per_step: int) -> None:
        self.levels = [lv for lv in levels if lv.scope == "persistent"]
        self.tokens_per_step = tokens_per_step
        self.periods = {lv.name: step_period(lv, tokens_per_step) for lv in self.levels}
        self.buffers: dict[str, list[torch.Tensor | None]] = {lv.name: [None] * len(lv.params) for lv in self.levels}
        self.updates: dict[str, int] = {lv.name: 0 for lv in self.levels}
        self.last_grad_norm: float | None = None

    def is_due(self, level: Level, step: int) -> bool:
        return (step + 1) % self.periods[level.name] == 0

    @torch.no_grad()
    def before_optimizer_step(
        self, step: int, max_grad_norm: float | None = None, sum_over_shards: Callable | None = None
    ) -> list[str]:
        """Clip this step's gradients to ``max_grad_norm`` (None: no clipping), then hold back or release each level's
        gradients for optimizer step ``step + 1``; return the levels stepping. ``last_grad_norm`` keeps the norm of
        this step's gradients before clipping. ``sum_over_shards`` sums a tensor over the processes when each holds
        only a shard of the gradients (FSDP), so that all clip by the norm of the whole gradient."""
        grads = [p.grad for lv in self.levels for p in lv.params if p.grad is not None]
        if grads:
            total = torch.nn.utils.get_total_norm(grads)
            if sum_over_shards is not None:
                total = sum_over_shards(total.square()).sqrt()
            self.last_grad_norm = float(total)
            if max_grad_norm is not None:  # torch's clip_grad_norm_ rule: scale by max / (norm + 1e-6) when above
                torch._foreach_mul_(grads, (max_grad_norm / (total + 1e-6)).clamp(max=1.0).to(grads[0].device))
        due = []
        for lv in self.levels:
            buffers = self.buffers[lv.name]
            if self.is_due(lv, step):
                for i, p in enumerate(lv.params):
                    if buffers[i] is not None:
                        p.grad = buffers[i] if p.grad is None else p.grad.add_(buffers[i])
                        buffers[i] = None
                self.updates[lv.name] += 1
                due.append(lv.name)
            else:
                for i, p in enumerate(lv.params):
                    if p.grad is not None:
                        buffers[i] = p.grad if buffers[i] is None else buffers[i].add_(p.grad)
                        p.grad = None
        return due

    def state_dict(self) -> dict:
        return {"buffers": self.buffers, "updates": dict(self.updates), "periods": dict(self.periods)}

    def load_state_dict(self, state: dict) -> None:
        periods = state.get("periods")
        if periods is not None and {k: v for k, v in periods.items() if k in self.periods} != {
            k: v for k, v in self.periods.items() if k in periods
        }:
            raise ValueError(
                f"the checkpoint's levels step every {periods} optimizer steps but this run's every {self.periods}: "
                "keep the tokens per optimizer step of the checkpoint (batch x devices x accumulation)"
            )
        saved = state.get("buffers", {})
        for lv in self.levels:
            bufs = saved.get(lv.name)
            if bufs is not None and len(bufs) == len(lv.params):
                self.buffers[lv.name] = [None if b is None else b.to(p.device) for b, p in zip(bufs, lv.params)]
        self.updates.update({k: v for k, v in state.get("updates", {}).items() if k in self.updates})

    def table(self, levels: Sequence[Level] | None = None) -> list[dict]:
        """One row per declared level (in-context ones too): what the run logs and prints."""
        levels = list(levels) if levels is not None else self.levels
        freqs = frequencies(levels, self.tokens_per_step)
        rows = []
        for lv in levels:
            persistent = lv.scope == "persistent"
            rows.append(
                {
                    "level": lv.name,
                    "scope": lv.scope,
                    "params": lv.num_params,
                    "chunk_tokens": resolved_chunk(lv, self.tokens_per_step),
                    "frequency": freqs[lv.name],
                    "period_steps": self.periods[lv.name] if persistent else None,
                    "updates": self.updates[lv.name] if persistent else None,
                    "update_rule": lv.update,
                    "objective": lv.objective,
                }
            )
        return rows
