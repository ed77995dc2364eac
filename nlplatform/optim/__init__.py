"""Outer optimizers, built from the recipe's ``optim`` section (``optim.name``).

- ``adamw``: torch's AdamW (the default).
- ``momentum``: generalised momentum, ``m <- alpha m - lr P(g)`` (``optim.precondition``: none or adam), and
  ``delta_momentum``: its L2-regression form with a gradient-dependent decay (``momentum.py``; Nested Learning arXiv
  §4.2-4.4).
- ``dmgd``: Deep Momentum GD, a learned MLP memory per tensor whose output is the update (``dmgd.py``; arXiv
  §4.4, Eq. 50).
- ``muon``: torch's Muon; ``m3``: Multi-scale Momentum Muon (``muon.py``; arXiv §4.4, §7.2 Alg. 1).

Parameter rule: the orthogonalising optimizers (muon, m3) take the 2-D hidden matrices only; embeddings, the output
head, norms and biases go to AdamW with the same learning rate and schedule. The others take every parameter.
Each level's groups keep their own learning rate and weight decay (see ``LMModule.configure_optimizers``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from nlplatform.config import OptimConfig
from nlplatform.errors import ConfigError
from nlplatform.optim._common import closure_loss
from nlplatform.validate import check_name as _check_known

# Every optimizer by name, with its default peak learning rate: the rate a recipe gets when it names the optimizer
# without an ``optim.lr`` of its own, or when the command line switches to it (``recipe.py``). Measured on the tiny
# recipes (tests/optim: each trains a tiny LM with it). Updates of the plain-gradient family (momentum, delta
# momentum, DMGD) scale with the gradient, so they need about 30x AdamW's rate; muon and m3 take normalised steps.
DEFAULT_LR = {"adamw": 3e-3, "momentum": 0.1, "delta_momentum": 0.1, "dmgd": 0.3, "muon": 3e-3, "m3": 1e-2}
OPTIMIZERS = tuple(DEFAULT_LR)
ORTHOGONALISING = ("muon", "m3")


def check_name(name: str) -> None:
    """Raise a ConfigError with a suggestion unless ``name`` is an available optimizer."""
    _check_known(name, OPTIMIZERS, "optim.name")


def default_lr(name: str) -> float:
    """The peak learning rate ``name`` trains with when the recipe gives none for it."""
    check_name(name)
    return DEFAULT_LR[name]


def peak_lr(cfg: OptimConfig) -> float:
    """``optim.lr``, or the optimizer's default when unset (a loaded recipe always has it set: ``recipe.py``)."""
    return default_lr(cfg.name) if cfg.lr is None else cfg.lr


class ParamSplit(Optimizer):
    """Several optimizers over disjoint parameter groups, seen by Lightning and the LR scheduler as one.

    ``param_groups`` are the parts' own group dicts, so a scheduler's learning-rate changes reach the parts; the
    closure (forward and backward) runs once, then every part steps."""

    def __init__(self, parts: list[Optimizer]) -> None:
        self.parts = parts
        super().__init__([p for part in parts for g in part.param_groups for p in g["params"]], {})
        self.param_groups = [g for part in parts for g in part.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        parts = state_dict.get("parts")
        if parts is None or len(parts) != len(self.parts):
            raise ValueError("optimizer state of another optimizer layout (a different optim.name?)")
        for part, state in zip(self.parts, parts):
            part.load_state_dict(state)
        self.param_groups = [g for part in self.parts for g in part.param_groups]  # loading made new group dicts


def _adamw(groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _build(name: str, groups: list[dict[str, Any]], cfg: OptimConfig) -> Optimizer:
    from nlplatform.optim.dmgd import DeepMomentumGD
    from nlplatform.optim.momentum import DeltaMomentum, GeneralizedMomentum
    from nlplatform.optim.muon import M3, muon

    if name == "adamw":
        return _adamw(groups, cfg)
    if name == "momentum":
        return GeneralizedMomentum(
            groups, lr=peak_lr(cfg), momentum=cfg.momentum, precondition=cfg.precondition, beta2=cfg.beta2, eps=cfg.eps
        )
    if name == "delta_momentum":
        return DeltaMomentum(
            groups,
            lr=peak_lr(cfg),
            momentum=cfg.momentum,
            decay_lr=cfg.decay_lr,
            normalize=cfg.normalize_decay,
            precondition=cfg.precondition,
            beta2=cfg.beta2,
            eps=cfg.eps,
        )
    if name == "dmgd":
        return DeepMomentumGD(
            groups, lr=peak_lr(cfg), hidden=cfg.dmgd_hidden, inner_lr=cfg.dmgd_inner_lr, retention=cfg.dmgd_retention
        )
    if name == "muon":
        return muon(groups, lr=peak_lr(cfg), momentum=cfg.momentum, weight_decay=0.0, ns_steps=cfg.ns_steps)
    if name == "m3":
        return M3(
            groups,
            lr=peak_lr(cfg),
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            beta3=cfg.beta3,
            slow_weight=cfg.slow_weight,
            slow_every=cfg.slow_every,
            eps=cfg.eps,
            ns_steps=cfg.ns_steps,
            accumulate=cfg.m3_accumulate,
            normalize=cfg.m3_normalize,
        )
    check_name(name)
    raise AssertionError(f"optimizer {name!r} is listed but not built")


def level_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> tuple[list[dict[str, Any]], set[int]]:
    """The optimizer's parameter groups, two per persistent level (named after it; weight decay on matrices only,
    never on embeddings, norms or biases), and the ids of the parameters that orthogonalising optimizers leave
    to AdamW (embeddings and the output head). In-context levels are learned inside the forward pass, not here."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    groups = []
    for level in model.levels():
        if level.scope != "persistent" or not level.params:
            continue
        lr = peak_lr(cfg)
        decay = [p for p in level.params if p.ndim >= 2 and id(p) not in embedding_ids]
        no_decay = [p for p in level.params if p.ndim < 2 or id(p) in embedding_ids]
        for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "lr": lr, "weight_decay": wd, "level": level.name})
    head = getattr(model, "output_weight", None)
    return groups, embedding_ids | ({id(head)} if head is not None else set())


def build_optimizer(
    param_groups: list[dict[str, Any]], cfg: OptimConfig, adamw_only: set[int] | None = None
) -> Optimizer:
    """The optimizer named by ``cfg.name`` over ``param_groups`` (each group may carry its own lr / weight_decay).

    For muon and m3, parameters that are not 2-D matrices or whose ``id`` is in ``adamw_only`` (embeddings, output
    head) are moved into AdamW groups with the same settings."""
    try:
        if cfg.name not in ORTHOGONALISING:
            return _build(cfg.name, param_groups, cfg)
        hidden, rest = [], []
        for group in param_groups:
            mats = [p for p in group["params"] if p.ndim == 2 and id(p) not in (adamw_only or set())]
            others = [p for p in group["params"] if not (p.ndim == 2 and id(p) not in (adamw_only or set()))]
            for target, params in ((hidden, mats), (rest, others)):
                if params:
                    target.append({**group, "params": params})
        parts = [_build(cfg.name, hidden, cfg)] if hidden else []
        parts += [_adamw(rest, cfg)] if rest else []
        return parts[0] if len(parts) == 1 else ParamSplit(parts)
    except ValueError as exc:  # the optimizers' own checks of their hyperparameters
        raise ConfigError(f"optim ({cfg.name}): {exc}") from None
