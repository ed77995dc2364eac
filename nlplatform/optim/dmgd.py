"""Deep Momentum Gradient Descent, DMGD (Nested Learning arXiv §4.4, Eq. 50; NeurIPS Eq. 23): the momentum is a learned
MLP memory of the gradient stream, and its output is the update.

The paper gives the form ``W <- W + m(u)``, ``m <- alpha m - eta grad L2(m; u)`` with ``u`` the gradient, and leaves
the memory's architecture and inner objective open. The platform's choice, per parameter tensor:

- **Memory.** A residual MLP applied to every entry, reading the entry's current gradient and its own previous output
  (both divided by the gradient's RMS, so it sees unit-scale inputs whatever the layer)::

      o_t = M(g_t, o_{t-1}) = g_t + s * W2 tanh(W1 [g_t / s, o_{t-1} / s] + b1),   s = rms(g_t)

  With ``W2 = 0`` (its initial value) the memory is the identity and DMGD is plain gradient descent; the recurrent
  input lets it represent any linear momentum (``o_t = a g_t + b o_{t-1}``) and non-linear ones beyond it.
- **Inner objective: predict the next gradient.** After gradient ``g_t`` arrives, the memory takes one gradient
  step on ``mean((M(g_{t-1}, o_{t-2}) - g_t)^2) / s^2``: what it remembers is whatever in the past stream predicts the
  coming gradient, which is what heavy-ball momentum assumes (gradients are correlated in time) without fixing
  the decay. Its parameters keep a retention factor ``alpha`` (the paper's ``alpha m``): they decay toward the
  identity memory when the stream stops being predictable.
- **Update:** ``W <- W (1 - lr wd) - lr * o_t``.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from nlplatform.optim._common import check_hyperparameters, closure_loss, params_with_grad


class DeepMomentumGD(Optimizer):
    """The update of each parameter is the output of its own small MLP memory, trained online on the gradient stream."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        hidden: int = 8,
        inner_lr: float = 0.1,
        retention: float = 0.999,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        check_hyperparameters(lr=lr, inner_lr=inner_lr, weight_decay=weight_decay)
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 < retention <= 1.0:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        defaults = dict(lr=lr, hidden=hidden, inner_lr=inner_lr, retention=retention, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict:
        # the generator draws each new parameter's memory: a resumed run must draw what the uninterrupted one would
        return {**super().state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if generator is not None:
            self._generator.set_state(generator)

    def _new_memory(self, p: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
        w1 = torch.randn(hidden, 2, generator=self._generator) / 2**0.5
        return {
            "w1": w1.to(p.device),
            "b1": torch.zeros(hidden, device=p.device),
            "w2": torch.zeros(1, hidden, device=p.device),
        }

    @staticmethod
    def _read(memory: dict[str, torch.Tensor], g: torch.Tensor, prev: torch.Tensor, scale: torch.Tensor):
        """``M(g, prev)`` for every entry (flattened)."""
        features = torch.stack((g / scale, prev / scale), dim=-1)  # [n, 2]
        hidden = torch.tanh(features @ memory["w1"].T + memory["b1"])  # [n, h]
        return g + scale * (hidden @ memory["w2"].T).squeeze(-1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, p in params_with_grad(self):
            g = p.grad.float().flatten()
            scale = g.pow(2).mean().sqrt().clamp_min(1e-12)
            state = self.state[p]
            if not state:
                state.update(self._new_memory(p, group["hidden"]))
                state["prev_grad"] = torch.zeros_like(g)
                state["prev_out"] = torch.zeros_like(g)
                state["prev_prev_out"] = torch.zeros_like(g)
                state["step"] = 0
            state["step"] += 1
            memory = {k: state[k] for k in ("w1", "b1", "w2")}
            if state["step"] > 1:  # learn: the previous read should have predicted this gradient
                with torch.enable_grad():
                    leaves = {k: v.detach().requires_grad_() for k, v in memory.items()}
                    guess = self._read(leaves, state["prev_grad"], state["prev_prev_out"], scale)
                    inner = (guess - g).pow(2).mean() / scale**2
                    grads = torch.autograd.grad(inner, list(leaves.values()))
                for value, grad in zip(memory.values(), grads):
                    value.mul_(group["retention"]).sub_(grad, alpha=group["inner_lr"])
                state["inner_loss"] = float(inner)
            out = self._read(memory, g, state["prev_out"], scale)
            state["prev_grad"], state["prev_prev_out"], state["prev_out"] = g, state["prev_out"], out
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(out.view_as(p).to(p.dtype), alpha=-group["lr"])
        return loss
