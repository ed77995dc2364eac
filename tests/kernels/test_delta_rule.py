"""The (gated) delta rule reference: the chunked form equals the step-by-step recurrence, and the op checks inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._dispatch import resolve_backend
from kernels._testing import assert_close
from kernels.delta_rule import chunk_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule

B, H, K, V = 2, 3, 8, 6


def make_inputs(T, *, gated=True, dtype=torch.float64, initial_state=True, seed=0, k_dim=K, v_dim=V):
    """Layer-like inputs: L2-normalised keys, beta in (0, 1), log decays g <= 0; all leaves require grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": randn(B, T, H, k_dim),
        "k": F.normalize(randn(B, T, H, k_dim), dim=-1),
        "v": randn(B, T, H, v_dim),
        "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64),
        "g": F.logsigmoid(randn(B, T, H) + 2) if gated else None,
        "initial_state": randn(B, H, k_dim, v_dim) if initial_state else None,
    }
    return {n: None if x is None else x.to(dtype).requires_grad_() for n, x in inputs.items()}


def run(fn, inputs, **kwargs):
    args = {n: inputs[n] for n in ("q", "k", "v", "beta", "g")}
    return fn(**args, initial_state=inputs["initial_state"], output_final_state=True, **kwargs)


def outputs_and_grads(fn, inputs, **kwargs):
    """Output, final state and the gradient of every input under a fixed random cotangent on both outputs."""
    o, state = run(fn, inputs, **kwargs)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    leaves = {n: x for n, x in inputs.items() if x is not None}
    grads = torch.autograd.grad((o * do).sum() + (state * ds).sum(), list(leaves.values()))
    return {"o": o, "final_state": state, **{f"d{n}": g for n, g in zip(leaves, grads)}}


@pytest.mark.parametrize("T", [7, 33, 63, 100], ids=lambda t: f"T={t}")
@pytest.mark.parametrize("chunk_size", [4, 16, 64], ids=lambda c: f"C={c}")
@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
@pytest.mark.parametrize("initial_state", [False, True], ids=["h0=0", "h0"])
def test_chunked_equals_recurrent_in_fp64_with_state_and_every_gradient(T, chunk_size, gated, initial_state):
    """The chunkwise form reproduces the recurrence's output, final state and all input gradients in fp64."""
    inputs = make_inputs(T, gated=gated, initial_state=initial_state)
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs, scale=0.3)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs, scale=0.3, chunk_size=chunk_size)
    assert ref.keys() == out.keys()
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_gradcheck_on_a_tiny_fp64_case(form):
    """Autograd through either form matches finite differences."""
    inputs = make_inputs(5, initial_state=True)
    names = ["q", "k", "v", "beta", "g", "initial_state"]

    def fn(*xs):
        kw = dict(zip(names, xs))
        if form == "recurrent":
            return run(recurrent_gated_delta_rule, kw, scale=0.5)
        return run(chunk_gated_delta_rule, kw, scale=0.5, chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(inputs[n] for n in names))


def test_fp32_chunked_tracks_the_fp64_ground_truth():
    """In fp32 the chunked form stays within 1e-5 relative RMS of the fp64 recurrence, gradients included."""
    inputs64 = make_inputs(100)
    inputs32 = {n: x.detach().float().requires_grad_() for n, x in inputs64.items()}
    ref = outputs_and_grads(recurrent_gated_delta_rule, inputs64, scale=0.3)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs32, scale=0.3, chunk_size=64)
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_output_keeps_the_input_dtype_and_the_state_accumulates_in_at_least_fp32(dtype):
    """o comes back in v's dtype; the final state is fp32 for fp16/fp32 inputs and fp64 for fp64."""
    inputs = make_inputs(9, dtype=dtype, initial_state=False)
    for fn, kw in ((recurrent_gated_delta_rule, {}), (chunk_gated_delta_rule, {"chunk_size": 4})):
        o, state = run(fn, inputs, scale=0.3, **kw)
        assert o.dtype == dtype
        assert state.dtype == torch.promote_types(dtype, torch.float32)


def test_zero_log_decay_is_plain_deltanet():
    """g = 0 (alpha = 1) gives exactly the ungated delta rule."""
    inputs = make_inputs(33, gated=False)
    o_plain, s_plain = run(chunk_gated_delta_rule, inputs, scale=0.3, chunk_size=16)
    inputs["g"] = torch.zeros(B, 33, H, dtype=torch.float64)
    o_zero, s_zero = run(chunk_gated_delta_rule, inputs, scale=0.3, chunk_size=16)
    torch.testing.assert_close(o_zero, o_plain)
    torch.testing.assert_close(s_zero, s_plain)


def test_a_full_strength_write_is_recalled_exactly():
    """beta = 1 makes one delta-rule step solve ||S^T k - v||^2 exactly: the memory then returns v for key k."""
    inputs = make_inputs(1, gated=False)
    with torch.no_grad():
        inputs["beta"].fill_(1.0)
    _, state = run(recurrent_gated_delta_rule, inputs, scale=1.0)
    recalled = torch.einsum("bhk,bhkv->bhv", inputs["k"][:, 0], state)
    torch.testing.assert_close(recalled, inputs["v"][:, 0])


def test_splitting_a_sequence_and_carrying_the_state_changes_nothing():
    """Running [0, t) then [t, T) from the carried state gives the whole-sequence run (what decoding relies on)."""
    inputs = make_inputs(40)
    o_full, s_full = run(gated_delta_rule, inputs, chunk_size=16)
    first = {n: None if x is None else (x if n == "initial_state" else x[:, :25]) for n, x in inputs.items()}
    o1, s1 = run(gated_delta_rule, first, chunk_size=16)
    second = {n: None if x is None else x[:, 25:] for n, x in inputs.items() if n != "initial_state"}
    o2, s2 = run(gated_delta_rule, {**second, "initial_state": s1}, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full)
    torch.testing.assert_close(s2, s_full)


def test_the_op_defaults_to_scale_one_over_sqrt_k_and_no_final_state():
    """Without scale the op reads out with K^-1/2, and returns no final state unless asked."""
    inputs = make_inputs(10)
    args = {n: inputs[n] for n in ("q", "k", "v", "beta", "g")}
    o, state = gated_delta_rule(**args)
    assert state is None
    o_ref, _ = recurrent_gated_delta_rule(**args, scale=K**-0.5)
    torch.testing.assert_close(o, o_ref)


def test_different_key_and_value_widths_are_supported():
    """K != V works in both forms and they agree."""
    inputs = make_inputs(20, k_dim=4, v_dim=12)
    ref = run(recurrent_gated_delta_rule, inputs, scale=0.5)
    out = run(chunk_gated_delta_rule, inputs, scale=0.5, chunk_size=8)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a)


def _bad(**changes):
    inputs = {n: None if x is None else x.detach() for n, x in make_inputs(8, dtype=torch.float32).items()}
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"q": torch.randn(B, 8, H)}, ValueError, r"q must be \[B, T, H, K\]"),
        ({"k": torch.randn(B, 8, H, K + 1)}, ValueError, "k must have q's shape"),
        ({"v": torch.randn(B, 7, H, V)}, ValueError, r"v must be \[B, T, H, V\]"),
        ({"beta": torch.rand(B, 8, H, 1)}, ValueError, r"beta must be \[B, T, H\]"),
        ({"g": torch.zeros(B, 8)}, ValueError, r"g must be \[B, T, H\]"),
        ({"initial_state": torch.zeros(B, H, V, K)}, ValueError, r"initial_state must be \[B, H, K, V\]"),
        ({"v": torch.randn(B, 8, H, V, dtype=torch.float64)}, TypeError, "share one dtype"),
        ({"beta": torch.ones(B, 8, H, dtype=torch.long)}, TypeError, "beta must be a floating-point tensor"),
        ({"q": torch.randn(B, 0, H, K), "k": torch.randn(B, 0, H, K)}, ValueError, "empty"),
    ],
    ids=["q-rank", "k-shape", "v-length", "beta-shape", "g-shape", "state-shape", "mixed-dtype", "int-beta", "T=0"],
)
def test_bad_inputs_get_an_error_that_names_the_fix(changes, error, match):
    """Wrong shapes, dtypes or an empty sequence fail with a message naming the expected layout."""
    inputs = _bad(**changes)
    with pytest.raises(error, match=match):
        run(gated_delta_rule, inputs)


@pytest.mark.parametrize("chunk_size", [0, -64, 2.5, True])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    """A chunk size that is not a positive int is refused."""
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        run(gated_delta_rule, _bad(), chunk_size=chunk_size)


def test_backends_that_do_not_exist_are_refused_with_the_available_ones():
    """An unknown backend, or one the op lacks, fails with the list of available backends."""
    with pytest.raises(ValueError, match="backend must be one of"):
        run(gated_delta_rule, _bad(), backend="cuda")
    with pytest.raises(ValueError, match="available: reference"):
        resolve_backend("op", "triton", torch.zeros(1), ("reference",))


def test_auto_picks_triton_for_cuda_tensors_of_ops_with_kernels_and_the_reference_otherwise():
    """backend="auto" is decided by the tensors' device and what the op implements: Triton for CUDA tensors when the
    op has kernels, the reference for CPU tensors or ops without kernels (so CPU runs never need Triton)."""
    from types import SimpleNamespace

    on_gpu, on_cpu = SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert resolve_backend("op", "auto", on_gpu, ("triton", "reference")) == "triton"
    assert resolve_backend("op", "auto", on_gpu, ("reference",)) == "reference"
    assert resolve_backend("op", "auto", on_cpu, ("triton", "reference")) == "reference"
    assert resolve_backend("op", "reference", on_gpu, ("triton", "reference")) == "reference"
