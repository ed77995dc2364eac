"""The Triton backend of the (gated) delta rule equals the PyTorch reference on output, final state and every gradient.

On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py before anything
imports them): fp32 and fp16 only, since the interpreter gets bf16 wrong, and small shapes. The ``gpu`` tests take
bf16 and fp32 at realistic lengths on a CUDA device (``pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._dispatch import triton_interpreted
from kernels._testing import assert_backends_agree, assert_close, autocast_train_step, count_calls
from kernels.delta_rule import gated_delta_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative RMS error allowed against the reference. fp16/bf16 round every stored intermediate (w, u, v_new, the chunk
# states) to the input dtype, as the tensor-core operands must be.
RATIO = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GPU_FP32_RATIO = 1e-4  # IEEE fp32 products, but a different summation order than the reference's matmuls

needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreted(),
    reason="no CUDA device and TRITON_INTERPRET is not set (tests/conftest.py sets it when CUDA is absent)",
)
pytestmark = needs_triton


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """NaN-fill every fresh allocation, so an output element a kernel forgets to write shows up as a NaN."""

    def poisoned(fn):
        def alloc(*args, **kwargs):
            x = fn(*args, **kwargs)
            return x.fill_(float("nan")) if x.is_floating_point() else x

        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))


def make_inputs(B, T, H, K, V, dtype, *, gated=True, initial_state=True, beta_max=1.0, seed=0, device=DEVICE):
    """Layer-like inputs (L2-normalised keys, beta in (0, beta_max), log decays g <= 0), leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    inputs = {
        "q": randn(B, T, H, K),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "beta": beta_max * torch.rand(B, T, H, generator=gen),
        "g": F.logsigmoid(randn(B, T, H) + 2) if gated else None,
        "initial_state": randn(B, H, K, V) if initial_state else None,
    }
    return {n: None if x is None else x.to(device, dtype).requires_grad_() for n, x in inputs.items()}


def outputs_and_grads(inputs, backend, *, chunk_size=64, output_final_state=True, seed=1):
    """Output, final state and every input gradient under fixed random cotangents on both outputs."""
    args = {n: inputs[n] for n in ("q", "k", "v", "beta", "g")}
    o, state = gated_delta_rule(
        **args,
        initial_state=inputs["initial_state"],
        output_final_state=output_final_state,
        chunk_size=chunk_size,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen).to(state.device)).sum()
    leaves = {n: x for n, x in inputs.items() if x is not None}
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"o": o, "final_state": state, **{f"d{n}": g for n, g in zip(leaves, grads)}}


def assert_all_close(ref, out, ratio):
    assert ref.keys() == out.keys()
    for name in ref:
        if ref[name] is None:
            assert out[name] is None, name
        else:
            assert out[name].dtype == ref[name].dtype, name
            assert_close(name, ref[name], out[name], ratio)


def test_the_interpreter_runs_the_kernels_runtime_bounded_loops():
    """Runs first: a triton/numpy pair whose interpreter breaks on loops over a runtime bound fails here, by name."""
    inputs = make_inputs(1, 20, 1, 16, 16, torch.float32)
    try:
        o, _ = gated_delta_rule(**{n: x.detach() for n, x in inputs.items()}, chunk_size=16, backend="triton")
    except TypeError as err:
        import numpy
        import triton

        pytest.fail(
            f"triton {triton.__version__} with numpy {numpy.__version__} cannot run the kernels in the interpreter "
            f"({err}); use triton >= 3.8 with numpy 2.4, or numpy < 2.4 with triton 3.6"
        )
    assert torch.isfinite(o).all()


CASES = [
    # B, T, H, K, V, dtype, gated, initial_state, chunk_size
    (1, 7, 1, 16, 16, torch.float32, False, False, 16),
    (2, 33, 2, 32, 16, torch.float32, True, True, 16),
    (2, 40, 2, 16, 32, torch.float32, True, True, 32),
    (1, 50, 2, 8, 24, torch.float32, True, False, 64),  # head dims below the 16-wide tiles and not powers of two
    (1, 64, 1, 32, 32, torch.float16, True, True, 64),
    (2, 63, 2, 32, 32, torch.float16, False, True, 32),
]


@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "dtype", "gated", "initial_state", "chunk_size"),
    [
        pytest.param(
            *c,
            id="B{}-T{}-H{}-K{}-V{}-{}-{}-{}-C{}".format(
                *c[:5], str(c[5])[6:], "gated" if c[6] else "deltanet", "h0" if c[7] else "h0=0", c[8]
            ),
        )
        for c in CASES
    ],
)
@pytest.mark.slow
def test_triton_equals_the_reference_on_output_state_and_every_gradient(
    B, T, H, K, V, dtype, gated, initial_state, chunk_size
):
    """Output, final state and the gradients of q, k, v, beta, g and the initial state match the reference."""
    inputs = make_inputs(B, T, H, K, V, dtype, gated=gated, initial_state=initial_state)
    ref = outputs_and_grads(inputs, "reference", chunk_size=chunk_size)
    out = outputs_and_grads(inputs, "triton", chunk_size=chunk_size)
    assert_all_close(ref, out, RATIO[dtype])


def test_negative_eigenvalue_writes_and_no_final_state_match_the_reference():
    """beta in (0, 2) (DeltaNet's allow_neg_eigval) and output_final_state=False (no state gradient) both hold."""
    inputs = make_inputs(2, 48, 2, 16, 16, torch.float32, beta_max=2.0)
    ref = outputs_and_grads(inputs, "reference", chunk_size=64, output_final_state=False)
    out = outputs_and_grads(inputs, "triton", chunk_size=64, output_final_state=False)
    assert out["final_state"] is None
    assert_all_close(ref, out, RATIO[torch.float32])


def test_strided_inputs_give_the_same_result_as_contiguous_ones():
    """Views such as a projection split into heads (non-contiguous) are read correctly."""
    inputs = make_inputs(2, 24, 2, 16, 16, torch.float32)
    qkv = torch.cat([inputs["q"], inputs["k"], inputs["v"]], dim=-1).detach()
    q, k, v = qkv.split(16, dim=-1)  # views with a row stride of 48
    assert not q.is_contiguous()
    kw = dict(initial_state=inputs["initial_state"].detach(), output_final_state=True, chunk_size=16)
    strided = gated_delta_rule(q, k, v, inputs["beta"].detach(), inputs["g"].detach(), backend="triton", **kw)
    plain = gated_delta_rule(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        inputs["beta"].detach(),
        inputs["g"].detach(),
        backend="reference",
        **kw,
    )
    for a, b in zip(plain, strided):
        assert_close("strided", a, b, RATIO[torch.float32])


@pytest.mark.parametrize(
    ("dtype", "chunk_size", "k_dim", "match"),
    [
        (torch.float32, 128, 16, "chunk_size=128"),
        (torch.float32, 8, 16, "chunk_size=8"),
        (torch.float64, 64, 16, "dtype torch.float64"),
        (torch.float32, 64, 512, "key head dim 512"),
    ],
)
def test_inputs_the_kernels_do_not_take_are_refused_by_name_on_the_triton_backend(dtype, chunk_size, k_dim, match):
    """backend='triton' says which input it cannot take and points to the reference backend."""
    inputs = make_inputs(1, 4, 1, k_dim, 8, dtype, initial_state=False)
    with pytest.raises(ValueError, match=f"Triton backend does not take {match}.*backend='reference'"):
        outputs_and_grads(inputs, "triton", chunk_size=chunk_size)


def test_triton_on_cpu_without_the_interpreter_names_the_environment_variable(monkeypatch):
    """Outside the interpreter a CPU tensor cannot run Triton, and the error says how to get the interpreter."""
    if DEVICE != "cpu":
        pytest.skip("a CUDA device runs Triton natively")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    inputs = make_inputs(1, 4, 1, 16, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        outputs_and_grads(inputs, "triton")


@pytest.mark.slow
def test_a_deltanet_model_on_the_triton_backend_equals_the_reference_model():
    """The model wiring: DeltaNet and Gated DeltaNet logits and weight gradients agree across backends."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf (GPU machines may lack it)")
    from nlplatform.models.deltanet import DeltaNet, DeltaNetConfig, GatedDeltaNetConfig

    small = dict(d_model=32, n_layers=1, n_heads=2, vocab_size=50, chunk_size=16)
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for config in (DeltaNetConfig, GatedDeltaNetConfig):
        assert_backends_agree(
            config.__name__, lambda backend, config=config: DeltaNet(config(**small, kernel_backend=backend)), ids
        )


# ---- GPU: bf16 and fp32 at realistic lengths (pytest -m gpu on a CUDA machine) ----

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(("B", "T", "H", "D"), [(2, 1000, 4, 64), (1, 4096, 2, 128), (4, 2048, 3, 128)])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "deltanet"])
def test_gpu_triton_tracks_the_fp32_reference(dtype, B, T, H, D, gated):
    """On a GPU: the kernel in bf16/fp32 against the reference run in fp32 on the same (rounded) inputs."""
    inputs = make_inputs(B, T, H, D, D, dtype, gated=gated)
    ref_inputs = {n: None if x is None else x.detach().float().requires_grad_() for n, x in inputs.items()}
    ref = outputs_and_grads(ref_inputs, "reference")
    out = outputs_and_grads(inputs, "triton")
    for name in ref:
        assert_close(name, ref[name], out[name], GPU_FP32_RATIO if dtype == torch.float32 else RATIO[dtype])


@gpu
@needs_cuda
def test_gpu_auto_picks_triton_and_falls_back_to_the_reference_for_other_chunk_sizes(monkeypatch):
    """backend='auto' on CUDA runs the kernels for chunk sizes they tile and the reference otherwise."""
    from kernels.delta_rule import autograd

    calls = count_calls(monkeypatch, autograd, "triton_gated_delta_rule")
    inputs = make_inputs(1, 256, 2, 64, 64, torch.bfloat16)
    outputs_and_grads(inputs, "auto", chunk_size=64)
    assert calls == [1]
    outputs_and_grads(inputs, "auto", chunk_size=128)
    assert calls == [1]


@gpu
@needs_cuda
def test_gpu_deltanet_models_run_the_kernel_under_bf16_autocast(monkeypatch):
    """Under CUDA autocast (which computes norms in fp32) the models still hand the kernel one dtype, and train."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf")
    from kernels.delta_rule import autograd
    from nlplatform.models.deltanet import DeltaNet, DeltaNetConfig, GatedDeltaNetConfig

    calls = count_calls(monkeypatch, autograd, "triton_gated_delta_rule")
    for config in (DeltaNetConfig, GatedDeltaNetConfig):
        autocast_train_step(DeltaNet(config(d_model=128, n_layers=2, n_heads=2, vocab_size=100)).cuda(), 100)
    assert len(calls) == 4  # two layers, two families
