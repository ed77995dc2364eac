"""Tile sizes and launch settings shared by the delta-rule kernels.

The warp counts come from compiling every kernel for sm_90 (H100) at BT = 64, K = V = 128 in bf16 and reading
ptxas' register and spill report: at 4 warps the [64, 64] and [64, 128] register tiles spill, at 8 they fit or
nearly so. They are a starting point, not a tuned result (see bench/ops/delta_rule.py for measured speed).
"""

from __future__ import annotations

import triton


def block(n: int, cap: int) -> int:
    """A tile edge for a dimension of size n: a power of two, at least 16 (tl.dot's minimum) and at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def state_block(K: int) -> int:
    """The state's K tile: all of K at once (a power of two >= 16); larger keys go to the reference backend."""
    return max(16, triton.next_power_of_2(K))


def num_warps(chunk_size: int) -> int:
    """Warps per program: 8 for 64-token chunks (their [64, 64] and [64, K] tiles need the registers), else 4."""
    return 8 if chunk_size >= 64 else 4
