"""Orthogonalising optimizers: Muon (torch's) and Multi-scale Momentum Muon, M3 (Nested Learning arXiv §4.4, §7.2; Eq.
42-44, Alg. 1).

Muon is momentum with a non-linear read-out (arXiv Eq. 52): ``W <- W - lr * NewtonSchulz(m)``. The platform uses
``torch.optim.Muon`` itself, with ``adjust_lr_fn="match_rms_adamw"`` so that an AdamW learning rate carries over.

M3 is a Continuum Memory System over the gradient stream (Alg. 1): a fast momentum read every step and a slow one
that absorbs the sum of a chunk of ``slow_every`` gradients once per chunk, both orthogonalised, combined and divided
by Adam's second moment::

    every step t:            M1 <- beta1 M1 + g_t          V <- beta2 V + (1 - beta2) g_t^2
    when t = k * f + 1:      M2 <- beta3 M2 + sum of the previous chunk's f gradients,   O2 <- NS(M2)
    U = (NS(M1) + alpha * O2) / (sqrt(V_hat) + eps)
    W <- W - lr * 0.2 * U / RMS(U)                    (normalize=True, the default)

The printed update is ``lr * U``. Its scale is that of an orthogonal matrix's entries (about 1/sqrt(width)) over the
gradient's (often 1e-3 or less), so it grows as the gradients shrink: on a tiny byte-level Transformer++ it diverged
to the uniform distribution at every lr from 1e-2 to 1e-3 and barely learned at 1e-4. Normalising the combined update
to AdamW's typical update RMS (0.2, as torch's Muon does with ``match_rms_adamw``) keeps the printed direction and
makes ``lr`` an AdamW learning rate; ``normalize=False`` is the printed form.

Alg. 1 prints cumulative sums (``M1 <- M1 + beta1 g``, ``V <- V + beta2 g^2``); read literally the fast momentum never
forgets and the step shrinks like 1/sqrt(t) as in AdaGrad. The default here decays them (``accumulate="ema"``, Adam's
bias-corrected second moment); ``accumulate="sum"`` is the printed form. Newton-Schulz output does not depend on the
scale of its input, and with ``normalize`` neither does the step, so the two forms differ only in what the momenta
and the second moment remember.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from nlplatform.optim._common import check_hyperparameters, closure_loss, params_with_grad

# The quintic iteration's coefficients (Muon's): maximise the slope at 0 while keeping singular values in ~[0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The RMS of a typical AdamW update entry (|m / sqrt(v)| ~ 0.2 in steady state), which torch's Muon also matches.
ADAMW_UPDATE_RMS = 0.2


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with ``g``'s singular vectors: ``U V^T`` of ``g = U S V^T``, by the quintic
    Newton-Schulz iteration on ``g / ||g||_F`` (arXiv Eq. 43-44), in float32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class M3(Optimizer):
    """Multi-scale Momentum Muon for 2-D matrices: fast and slow orthogonalised momenta over Adam's second moment."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.95,
        beta3: float = 0.9,
        slow_weight: float = 1.0,
        slow_every: int = 10,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        accumulate: str = "ema",
        normalize: bool = True,
    ) -> None:
        check_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, eps=eps, weight_decay=weight_decay)
        if slow_every < 1:
            raise ValueError(f"slow_every must be >= 1 optimizer step, got {slow_every}")
        if slow_weight < 0:
            raise ValueError(f"slow_weight (alpha of Alg. 1) must be >= 0, got {slow_weight}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if accumulate not in ("ema", "sum"):
            raise ValueError(f"accumulate must be 'ema' or 'sum', got {accumulate!r}")
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            slow_weight=slow_weight,
            slow_every=slow_every,
            eps=eps,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            accumulate=accumulate,
            normalize=normalize,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"M3 orthogonalises 2-D matrices only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group, p in params_with_grad(self):
            ema = group["accumulate"] == "ema"
            g = p.grad.float()
            state = self.state[p]
            if not state:
                for key in ("fast", "slow", "second_moment", "chunk_sum", "slow_out"):
                    state[key] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] = 0
                state["slow_updates"] = 0
            state["step"] += 1
            t = state["step"]
            if t > 1 and (t - 1) % group["slow_every"] == 0:  # a new chunk starts: the slow level learns
                slow = state["slow"]
                if ema:
                    slow.mul_(group["beta3"]).add_(state["chunk_sum"])
                else:
                    slow.add_(state["chunk_sum"], alpha=group["beta3"])
                state["slow_out"] = newton_schulz(slow, group["ns_steps"])
                state["chunk_sum"].zero_()
                state["slow_updates"] += 1
            state["chunk_sum"].add_(g)
            fast, v = state["fast"], state["second_moment"]
            if ema:
                fast.mul_(group["beta1"]).add_(g)
                v.mul_(group["beta2"]).addcmul_(g, g, value=1.0 - group["beta2"])
                denom = (v / (1.0 - group["beta2"] ** t)).sqrt_().add_(group["eps"])
            else:
                fast.add_(g, alpha=group["beta1"])
                v.addcmul_(g, g, value=group["beta2"])
                denom = v.sqrt().add_(group["eps"])
            update = newton_schulz(fast, group["ns_steps"]).add_(state["slow_out"], alpha=group["slow_weight"])
            update.div_(denom)
            if group["normalize"]:
                update.mul_(ADAMW_UPDATE_RMS / (update.square().mean().sqrt() + group["eps"]))
            if group["weight_decay"]:
                p.mul_(1.0 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss


class Muon(torch.optim.Muon):
    """torch's Muon, with its Newton-Schulz iteration in float32 on CPUs.

    torch runs the iteration in bf16, which GPUs do fast and CPUs without bf16 matrix units do about 25x slower than
    float32 (tiny Transformer++ on 2 cores: 10 s per step). Off CUDA the step swaps torch's private iteration for
    :func:`newton_schulz` (same coefficients, float32) for its duration; on CUDA it is torch's step untouched."""

    def step(self, closure=None):
        module = getattr(torch.optim, "_muon", None)
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        if on_cuda or not hasattr(module, "_zeropower_via_newtonschulz"):
            return super().step(closure)
        torch_iteration = module._zeropower_via_newtonschulz
        module._zeropower_via_newtonschulz = _float32_iteration
        try:
            return super().step(closure)
        finally:
            module._zeropower_via_newtonschulz = torch_iteration


def _float32_iteration(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` signature over :func:`newton_schulz`."""
    if tuple(ns_coefficients) != NS_COEFFICIENTS:
        raise ValueError(f"the float32 Newton-Schulz iteration uses Muon's coefficients, got {ns_coefficients}")
    return newton_schulz(grad, ns_steps, eps).to(grad.dtype)


def muon(params, lr: float, momentum: float, weight_decay: float, ns_steps: int) -> Optimizer:
    """torch's Muon, with its learning rate matched to AdamW's update RMS (so one ``optim.lr`` serves both parts)."""
    check_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay)
    if ns_steps < 1:
        raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
    return Muon(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, adjust_lr_fn="match_rms_adamw"
    )
