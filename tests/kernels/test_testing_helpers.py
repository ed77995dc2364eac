"""The comparison helpers the GPU tests use, checked on the CPU where they can be: a helper that only ever ran on CPU
tensors once failed every GPU comparison before a kernel was reached."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kernels._testing import state_outputs_and_grads


def test_comparison_weights_follow_the_tensors_device():
    """The fixed random weighting of outputs and states is drawn on the CPU and moved to the tensors' device (here
    the meta device stands in for CUDA: a CPU tensor multiplied with it fails as on a GPU)."""
    x = torch.randn(4, 3, device="meta", requires_grad=True)
    w = torch.randn(3, 3, device="meta", requires_grad=True)
    state = SimpleNamespace(weights=[x @ w], momentum=[w * 2])
    out = state_outputs_and_grads("y", x * 3, state, {"x": x, "w": w})
    assert set(out) == {"y", "W[0]", "S[0]", "dx", "dw"}
    assert all(t.device.type == "meta" for t in out.values())


def test_comparison_weights_are_the_same_for_equal_inputs():
    """Two calls on equal tensors see the same weighting, so two implementations' gradients are comparable."""
    grads = []
    for _ in range(2):
        x = torch.ones(5, requires_grad=True)
        state = SimpleNamespace(weights=[x * 2], momentum=[])
        grads.append(state_outputs_and_grads("y", x.sin(), state, {"x": x})["dx"])
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
