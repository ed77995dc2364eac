"""Momentum as an associative memory of gradients (Nested Learning arXiv §4.2-4.4, Eq. 33, 46-49).

Momentum is a memory one level below the weights: it compresses the gradient stream, and the weights read it.

- **Generalised (value-aware / preconditioned) momentum**, arXiv Eq. 33 and 46-47::

      m <- alpha * m - lr * P(g)          W <- W + m

  ``alpha`` is the memory's forget gate. ``P`` is the value the memory associates with each gradient: the identity
  (plain heavy-ball momentum, the paper's dot-product memory) or Adam's diagonal second-moment preconditioner
  ``P(g) = g / (sqrt(v_hat) + eps)`` with ``v <- beta2 v + (1 - beta2) g^2`` (arXiv App. B: Adam's moments as optimal
  element-wise memories).

- **Delta momentum**, arXiv Eq. 48-49: the dot-product objective replaced by an L2 regression, whose gradient step
  adds a gradient-dependent decay::

      m <- m (alpha I - decay_lr * g_hat^T g_hat) - lr * P(g)

  The printed equations have no step size on the decay term; a literal gradient step on the L2 objective has one
  (arXiv §4.4), so it is explicit here as ``decay_lr``. ``g_hat = g / ||g||_F`` by default (``normalize=True``): then
  the eigenvalues of ``g_hat^T g_hat`` lie in [0, 1] and the decay factor stays within [alpha - decay_lr, alpha],
  inside [0, 1) whenever 0 <= decay_lr <= alpha < 1. Matrices are read as ``[rows, -1]``; for a vector or scalar
  ``g_hat^T g_hat`` is the number ``||g_hat||^2``.

Both apply decoupled weight decay ``W <- W (1 - lr * wd)`` before the update, as AdamW does.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from nlplatform.optim._common import check_hyperparameters, closure_loss, params_with_grad

PRECONDITIONERS = ("none", "adam")


class GeneralizedMomentum(Optimizer):
    """``m <- momentum * m - lr * P(g); W <- W + m`` with ``P`` the identity or Adam's diagonal preconditioner."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        precondition: str = "none",
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        check_hyperparameters(lr=lr, momentum=momentum, beta2=beta2, eps=eps, weight_decay=weight_decay)
        if precondition not in PRECONDITIONERS:
            raise ValueError(f"precondition must be one of {PRECONDITIONERS}, got {precondition!r}")
        defaults = dict(
            lr=lr, momentum=momentum, precondition=precondition, beta2=beta2, eps=eps, weight_decay=weight_decay
        )
        super().__init__(params, defaults)

    def _value(self, p: torch.Tensor, g: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """``P(g)``: the value the momentum memory stores for this gradient."""
        if group["precondition"] == "none":
            return g
        v = state.setdefault("second_moment", torch.zeros_like(p))
        v.mul_(group["beta2"]).addcmul_(g, g, value=1.0 - group["beta2"])
        v_hat = v / (1.0 - group["beta2"] ** state["step"])
        return g / (v_hat.sqrt() + group["eps"])

    def _decay(self, m: torch.Tensor, g: torch.Tensor, group: dict) -> torch.Tensor:
        """The memory's retention applied to the old momentum: ``alpha * m`` here."""
        return m.mul_(group["momentum"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, p in params_with_grad(self):
            g = p.grad.float()
            state = self.state[p]
            state["step"] = state.get("step", 0) + 1
            m = state.setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            value = self._value(p, g, group, state)
            m = self._decay(m, g, group)
            m.add_(value, alpha=-group["lr"])
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(m.to(p.dtype))
        return loss


class DeltaMomentum(GeneralizedMomentum):
    """``m <- m (momentum I - decay_lr g_hat^T g_hat) - lr P(g); W <- W + m`` (arXiv Eq. 48-49, decay step explicit)."""

    def __init__(
        self, params, lr: float = 1e-3, momentum: float = 0.9, decay_lr: float = 0.5, normalize: bool = True, **kwargs
    ) -> None:
        check_hyperparameters(decay_lr=decay_lr)
        if normalize and decay_lr > momentum:
            raise ValueError(
                f"decay_lr ({decay_lr}) must not exceed momentum ({momentum}): the decay factor "
                "momentum - decay_lr * sigma^2 would turn negative for a gradient direction with sigma = 1"
            )
        super().__init__(params, lr=lr, momentum=momentum, **kwargs)
        for group in self.param_groups:
            group.setdefault("decay_lr", decay_lr)
            group.setdefault("normalize", normalize)

    def _decay(self, m: torch.Tensor, g: torch.Tensor, group: dict) -> torch.Tensor:
        g_hat = g / g.norm().clamp_min(1e-12) if group["normalize"] else g
        if g.ndim < 2:
            return m.mul_(group["momentum"] - group["decay_lr"] * g_hat.pow(2).sum())
        rows = m.shape[0]
        m2, g2 = m.view(rows, -1), g_hat.reshape(rows, -1)
        # m (alpha I - zeta g^T g) = alpha m - zeta (m g^T) g: never forms the [cols, cols] matrix
        decayed = m2 * group["momentum"] - group["decay_lr"] * (m2 @ g2.T) @ g2
        return m.copy_(decayed.view_as(m))
