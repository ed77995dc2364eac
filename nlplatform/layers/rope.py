"""Rotary position embeddings (Su et al. 2021), half-split layout.

The head dimension D is split into halves (x1, x2); pair i = (x1[i], x2[i]) is rotated by the angle
``pos * theta^(-2i/D)``. A dot product of two rotated vectors then depends only on their relative position.
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, D] by angles given as cos/sin [T, D] or [B, T, D]; math in fp32, result in x's dtype."""
    cos = cos.unsqueeze(-2)  # broadcast over heads: [..., T, 1, D]
    sin = sin.unsqueeze(-2)
    x32 = x.float()
    return (x32 * cos + _rotate_half(x32) * sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary embedding for heads of size ``head_dim``, at positions ``offset .. offset+T-1`` or any given positions.

    cos/sin tables are built lazily per device, in fp64 on the CPU then stored in fp32, and regrown (to the next
    power of two) when a longer range is asked for; a table entry never depends on the table's length, so cached
    decoding at offset t sees exactly the values a full forward sees at position t. The module has no parameters
    or buffers, so it is unaffected by meta-device construction and ``to_empty``.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        inv_freq = self.theta ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)  # [D/2]
        angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # [..., D/2]
        return torch.cat((angles, angles), dim=-1)  # [..., D]: the same angle for both halves of each pair

    def cos_sin(
        self, length: int, offset: int = 0, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, D] (fp32) for positions ``offset .. offset+length-1``."""
        device = torch.device(device if device is not None else "cpu")
        end = offset + length
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < end:
            size = 1 << max(end - 1, 1).bit_length()  # next power of two >= end
            # Built outside inference mode and without autograd, so a table made while generating is still usable
            # (saved for backward) when training resumes.
            with torch.inference_mode(False), torch.no_grad():
                angles = self._angles(torch.arange(size))
                table = (angles.cos().float().to(device), angles.sin().float().to(device))
            self._tables[device] = table
        return table[0][offset:end], table[1][offset:end]

    def forward(self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rotate ``x`` [B, T, H, D]: at ``offset + arange(T)``, or at ``positions`` [T] / [B, T] when given."""
        if positions is None:
            cos, sin = self.cos_sin(x.shape[1], offset, x.device)
        else:
            with torch.no_grad():
                angles = self._angles(positions.cpu())
                cos, sin = angles.cos().float().to(x.device), angles.sin().float().to(x.device)
        return apply_rotary(x, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
