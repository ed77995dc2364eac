"""Causal depthwise short convolution: the local token mixing in front of linear-attention memories."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortConv(nn.Module):
    """``y_t = silu(sum_{i < width} w_i * x_{t - i})`` per channel, no bias (DeltaNet / GDN: width 4 on q, k, v).

    A depthwise convolution is per channel, so one ``ShortConv`` over the concatenated [q | k | v] projections is the
    same as one convolution on each. For decoding, ``forward(x, cache)`` reads the last ``width - 1`` inputs from
    ``cache`` [B, width - 1, channels] (zeros at the start of a sequence) and returns the updated one.
    """

    def __init__(self, channels: int, width: int = 4) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"ShortConv width must be > 0, got {width}")
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, 1, width))  # the layout F.conv1d expects for groups=channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default (Kaiming-uniform with a=sqrt(5): bound = 1/sqrt(fan_in) = 1/sqrt(width)).
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, channels] -> (y [B, T, channels], the last ``width - 1`` inputs for the next call)."""
        B, T, D = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.width - 1, D)
        padded = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, width - 1 + T, D]
        y = F.conv1d(padded.transpose(1, 2), self.weight.to(x.dtype), groups=D)  # [B, D, T]
        return F.silu(y.transpose(1, 2)), padded[:, padded.shape[1] - (self.width - 1) :]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, width={self.width}"
