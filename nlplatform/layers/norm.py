"""Root-mean-square layer norm, plain and with an output gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in (at least) fp32, returned in
    x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def normed_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised, scaled x in at least fp32 (fp64 stays fp64)."""
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(x32.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normed_fp32(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * silu(gate)``, in fp32: the output gate of Gated DeltaNet (per head; Gated DeltaNet
    Fig. 1)."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = self.normed_fp32(x)
        return (y * F.silu(gate.to(y.dtype))).to(x.dtype)
