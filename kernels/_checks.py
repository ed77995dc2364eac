"""Input checks shared by the ops: errors that name the expected layout, raised before any work."""

from __future__ import annotations

import torch


def check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    """q, k [B, T, H, K] and v [B, T, H, V]: floating point, one dtype, T > 0. Returns (B, T, H, K)."""
    for label, x in (("q", q), ("k", k), ("v", v)):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            raise TypeError(f"{op}: {label} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError(f"{op}: the sequence is empty (T = 0); give at least one token")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them")
    return B, T, H, K


def check_per_token(op: str, shape: tuple[int, int, int], **gates: torch.Tensor | None) -> None:
    """Per-head, per-token scalars (beta, g, theta, ...): floating point and [B, T, H]; None is allowed."""
    for label, x in gates.items():
        if x is None:
            continue
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            raise TypeError(f"{op}: {label} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
        if x.shape != shape:
            raise ValueError(
                f"{op}: {label} must be [B, T, H] = [{shape[0]}, {shape[1]}, {shape[2]}] (one scalar per head and "
                f"token), got {tuple(x.shape)}"
            )


def check_chunk_size(op: str, chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def check_one_device(op: str, *tensors: torch.Tensor | None) -> None:
    devices = {str(x.device) for x in tensors if x is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(devices)}")
