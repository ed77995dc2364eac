"""Comparison helpers shared by the kernel tests (kept in the package so GPU machines can run them with only torch)."""

from __future__ import annotations

import torch


def err_ratio(ref: torch.Tensor, out: torch.Tensor) -> float:
    """RMS of the difference over RMS of the reference: a scale-free error that low-precision kernels can be held to
    (an absolute tolerance is meaningless for gradients that span orders of magnitude)."""
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Fail with the measured figures when ``out`` differs from ``ref`` by more than ``ratio`` (relative RMS)."""
    if ref.shape != out.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the output")
    err = err_ratio(ref, out)
    max_abs = (ref.detach().double() - out.detach().double()).abs().max().item()
    if not err <= ratio:
        raise AssertionError(f"{name}: relative RMS error {err:.3e} > {ratio:.1e} (max abs diff {max_abs:.3e})")
