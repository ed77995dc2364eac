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


def leaves_of(inputs: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a test's input dict by name (per-layer lists numbered ``name[i]``; None entries skipped)."""
    leaves = {}
    for name, x in inputs.items():
        if isinstance(x, list):
            leaves.update({f"{name}[{i}]": t for i, t in enumerate(x)})
        elif x is not None:
            leaves[name] = x
    return leaves


def state_outputs_and_grads(
    out_name: str, out: torch.Tensor, state, inputs: dict, allow_unused: bool = False
) -> dict[str, torch.Tensor]:
    """An op's output, its final state's weights ``W[i]`` and momentum ``S[i]``, and the gradient ``d<leaf>`` of every
    input leaf under one fixed random weighting of all of them, so two implementations can be compared on all at
    once. With ``allow_unused`` a leaf the op ignores has no entry; otherwise it is an error."""
    outs = {out_name: out, **{f"W[{i}]": w for i, w in enumerate(state.weights)}}
    outs.update({f"S[{i}]": s for i, s in enumerate(state.momentum)})
    gen = torch.Generator().manual_seed(1)  # drawn on the CPU (the same weights on every device), then moved
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)).sum()
        for t in outs.values()
    )
    leaves = leaves_of(inputs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=allow_unused)
    return {**outs, **{f"d{n}": g for n, g in zip(leaves, grads) if g is not None}}


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.<name>`` (pytest's monkeypatch undoes it) so every call appends to the returned list: the GPU
    tests check that a model really ran a kernel."""
    calls: list = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def autocast_train_step(model: torch.nn.Module, vocab_size: int, length: int = 512) -> None:
    """One bf16-autocast forward and backward of a language model on random CUDA token ids; the loss and every
    gradient must come out finite."""
    ids = torch.randint(0, vocab_size, (2, length), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss), loss
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def assert_backends_agree(name: str, build, ids: torch.Tensor, ratio: float = 1e-4) -> None:
    """The model wiring of a kernel: ``build(kernel_backend)`` (from the same seed each time) gives the same logits and
    parameter gradients with ``"triton"`` as with ``"reference"``, within ``ratio`` (relative RMS)."""
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = build(backend).to(ids.device)
        logits = model(ids)
        logits.float().square().mean().backward()
        results[backend] = [logits] + [p.grad for p in model.parameters() if p.grad is not None]
    assert len(results["reference"]) == len(results["triton"]), f"{name}: the backends train different parameters"
    for i, (ref, out) in enumerate(zip(results["reference"], results["triton"])):
        assert_close(f"{name}[{i}]", ref, out, ratio)
