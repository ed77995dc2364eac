"""Backend selection shared by every op: the one place that decides between Triton and the PyTorch reference."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "reference")


def triton_interpreted() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``, read by Triton when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(op: str, backend: str, x: torch.Tensor, available: tuple[str, ...]) -> str:
    """The concrete backend (``"triton"`` or ``"reference"``) that ``op`` runs for ``backend`` on tensors like ``x``.

    ``available`` lists the concrete backends the op implements. ``"auto"`` picks Triton for CUDA tensors when the op
    has a Triton kernel, and the reference otherwise; asking for a backend the op lacks is a ``ValueError`` that says
    what exists.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if "triton" in available and x.is_cuda else "reference"
    if backend not in available:
        raise ValueError(f"{op}: no {backend!r} backend; available: {', '.join(available)} (or 'auto')")
    if backend == "triton" and not x.is_cuda and not triton_interpreted():
        raise ValueError(
            f"{op}: backend='triton' on {x.device} tensors needs a CUDA device, or TRITON_INTERPRET=1 set before the "
            "kernels are imported (the CPU interpreter, for tests)"
        )
    return backend


def takes_inputs(op: str, backend: str, reason: str | None, unverified: str | None = None) -> bool:
    """After ``resolve_backend`` chose Triton: whether the kernels run, given why they cannot take these inputs
    (``reason``, None when they can). Under ``"auto"`` an unsupported input falls back to the reference (False); an
    explicit ``backend="triton"`` refuses it with the reason instead. ``unverified`` says why inputs the kernels take
    are still kept off them under ``"auto"`` (a configuration that failed on a GPU and has not been cleared since):
    ``"auto"`` runs the reference, an explicit ``"triton"`` runs the kernels (that is how a GPU check clears it)."""
    if reason is None:
        return backend == "triton" or unverified is None
    if backend == "triton":
        raise ValueError(f"{op}: the Triton backend does not take {reason}; use backend='reference'")
    return False
