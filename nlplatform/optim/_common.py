"""What every optimizer of the package shares: hyperparameter checks and the step's boilerplate."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.optim import Optimizer


def check_hyperparameters(**values: float) -> None:
    """Reject impossible optimizer settings with one clear message (``ValueError``)."""
    for name, value in values.items():
        if name in ("lr", "weight_decay", "eps", "decay_lr", "inner_lr") and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        if name in ("momentum", "beta1", "beta2", "beta3") and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def closure_loss(closure: Callable[[], torch.Tensor] | None) -> torch.Tensor | None:
    """Run ``step``'s closure (forward and backward) with gradients on, as torch's optimizers do."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def params_with_grad(optimizer: Optimizer) -> Iterator[tuple[dict, torch.nn.Parameter]]:
    """(group, parameter) for every parameter that has a gradient this step (a held-back level has none)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p
