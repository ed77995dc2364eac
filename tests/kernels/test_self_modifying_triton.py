"""The Triton backend of the self-modifying Titans memory (HOPE's main memory on the Titans memory kernels, the
generators in PyTorch) equals the reference on the output, every memory's final state and every gradient.

On a CPU the kernels run in Triton's interpreter (fp32 only here: the op computes in float32 whatever x's dtype). The
``gpu`` test takes a realistic shape on a CUDA device (``pytest -m gpu``).
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels._dispatch import triton_interpreted
from kernels._testing import assert_backends_agree, assert_close, autocast_train_step, count_calls
from kernels.self_modifying import AVAILABLE_BACKENDS, self_modifying_titans
from tests.kernels.test_delta_rule_triton import poisoned_allocations  # noqa: F401 (autouse: NaN-filled allocations)
from tests.kernels.test_self_modifying import make_inputs, outputs_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RATIO = 1e-5  # float32 on both sides: IEEE products, another summation order

pytestmark = [
    pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="triton is not installed"),
    pytest.mark.skipif(
        DEVICE == "cpu" and not triton_interpreted(),
        reason="no CUDA device and TRITON_INTERPRET is not set (tests/conftest.py sets it when CUDA is absent)",
    ),
]

CASES = [
    # T, depth, (C_gen, C_mem), dgd, retention, static k / v, initial momentum, momentum decay, max_grad_norm, act
    (21, 2, (4, 8), True, True, False, True, True, None, "gelu"),
    (33, 2, (16, 16), True, True, False, False, True, 0.5, "silu"),
    (21, 1, (8, 4), True, True, False, True, True, None, "gelu"),
    (20, 2, (4, 4), False, True, True, False, False, None, "gelu"),  # plain GD, static keys and values, no momentum
    (7, 1, (1, 1), True, False, False, False, True, 0.5, "silu"),  # the per-token rule, no retention
    (70, 2, (64, 64), True, True, False, True, True, 0.5, "gelu"),  # the largest chunk: a 64 x 64 DGD system
]


@pytest.mark.parametrize(
    ("T", "depth", "chunks", "dgd", "retention", "static", "init_momentum", "decay", "clip", "act"),
    CASES,
    ids=[
        f"T{c[0]}-depth{c[1]}-C{c[2][0]}x{c[2][1]}{'-dgd' if c[3] else '-gd'}{'' if c[4] else '-noret'}"
        f"{'-static' if c[5] else ''}{'-S0' if c[6] else ''}{'-decay' if c[7] else ''}"
        f"{'-clip' if c[8] else ''}-{c[9]}"
        for c in CASES
    ],
)
@pytest.mark.slow
def test_triton_equals_the_reference_on_output_states_and_every_gradient(
    T, depth, chunks, dgd, retention, static, init_momentum, decay, clip, act
):
    """o, the final weights and momentum of every memory (main and generators) and the gradients into x, q, the gate
    projections, the momentum decay, the learned initial weights and the initial momentum match the reference, with
    the exact DGD (the triangular solve per chunk and layer inside the kernels) and without."""
    inputs = make_inputs(T, depth, static_k=static, static_v=static, init_momentum=init_momentum, dtype=torch.float32)
    inputs = {n: (x.to(DEVICE) if torch.is_tensor(x) else x) for n, x in inputs.items()}
    if not decay:
        inputs["momentum_decay"] = None
    kw = dict(
        chunk_size=chunks[0],
        memory_chunk_size=chunks[1],
        dgd=dgd,
        retention=retention,
        activation=act,
        max_grad_norm=clip,
    )
    ref = outputs_and_grads(self_modifying_titans, inputs, backend="reference", **kw)
    out = outputs_and_grads(self_modifying_titans, inputs, backend="triton", **kw)
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], RATIO)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2])
def test_half_precision_models_get_half_precision_products_within_their_tolerance(depth):
    """With x in fp16 the op still computes in float32 but the kernels multiply fp16 roundings of their tiles (the
    tensor-core path bf16/fp16 models take): every output and gradient within 5e-3 of the reference."""
    inputs = make_inputs(33, depth, init_momentum=True, dtype=torch.float16)
    inputs = {n: (x.to(DEVICE) if torch.is_tensor(x) else x) for n, x in inputs.items()}
    kw = dict(chunk_size=8, memory_chunk_size=16, max_grad_norm=0.5)
    ref = outputs_and_grads(self_modifying_titans, inputs, backend="reference", **kw)
    out = outputs_and_grads(self_modifying_titans, inputs, backend="triton", **kw)
    for name in ref:
        assert_close(name, ref[name], out[name], 5e-3)


@pytest.mark.skipif(not triton_interpreted(), reason="checks the CPU interpreter's accesses (TRITON_INTERPRET=1)")
def test_every_main_memory_kernel_access_stays_inside_the_launch_tensors(monkeypatch):
    """HOPE's main memory (exact DGD, residual target) at chunk 64 with a partial last chunk and K = 64, run by the
    interpreter with every load and store checked against the launch's tensors (tests/kernels/bounds.py): none
    leaves them."""
    import tests.kernels.test_self_modifying as base
    from tests.kernels.bounds import checked_bounds

    for name, value in dict(B=1, H=1, K=64, HIDDEN=64).items():  # make_inputs reads its module's sizes
        monkeypatch.setattr(base, name, value)
    inputs = make_inputs(100, 2, init_momentum=True, dtype=torch.float16)
    with checked_bounds():
        out = outputs_and_grads(self_modifying_titans, inputs, backend="triton", chunk_size=64, memory_chunk_size=64)
    assert all(torch.isfinite(t).all() for t in out.values())


@pytest.mark.slow
def test_the_main_memory_recomputing_segment_states_in_the_backward_changes_nothing(monkeypatch):
    """With every chunk past the first segment recomputed in the backward (KEEP_ALL_CHUNKS forced down), the HOPE
    main memory still equals the reference."""
    from kernels.titans_memory import autograd

    monkeypatch.setattr(autograd, "KEEP_ALL_CHUNKS", 1)
    inputs = make_inputs(21, 2, init_momentum=True, dtype=torch.float32)
    kw = dict(chunk_size=4, memory_chunk_size=4, max_grad_norm=0.5)
    ref = outputs_and_grads(self_modifying_titans, inputs, backend="reference", **kw)
    out = outputs_and_grads(self_modifying_titans, inputs, backend="triton", **kw)
    for name in ref:
        assert_close(name, ref[name], out[name], RATIO)


@pytest.mark.slow
def test_a_hope_model_on_the_triton_backend_equals_the_reference_model():
    """The model wiring: HOPE logits and weight gradients agree across backends."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf (GPU machines may lack it)")
    from nlplatform.models.hope import Hope, HopeConfig

    small = dict(
        d_model=32,
        n_layers=1,
        n_heads=2,
        vocab_size=50,
        memory_chunk_size=8,
        projection_chunk_size=8,
        cms_chunk_sizes=[8],
    )
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    assert_backends_agree("hope", lambda backend: Hope(HopeConfig(**small, kernel_backend=backend)), ids)


# ---- GPU: realistic shapes (pytest -m gpu on a CUDA machine) ----

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@gpu
@needs_cuda
def test_gpu_hope_main_memory_tracks_the_reference_at_the_340m_widths(monkeypatch):
    """On a GPU: K = 128 per head, C_mem = 16, C_gen = 64, 2048 tokens, depth 2 with DGD and clipping, both backends
    in float32 (the op's compute dtype)."""
    import tests.kernels.test_self_modifying as base

    for name, value in dict(B=2, H=4, K=128, HIDDEN=128).items():  # make_inputs reads its module's sizes
        monkeypatch.setattr(base, name, value)
    inputs = make_inputs(2048, 2, init_momentum=True, dtype=torch.float32)
    inputs = {
        n: (x.cuda() if torch.is_tensor(x) else [t.cuda() for t in x] if isinstance(x, list) else x)
        for n, x in inputs.items()
    }
    kw = dict(chunk_size=64, memory_chunk_size=16, max_grad_norm=1.0)
    ref = outputs_and_grads(self_modifying_titans, inputs, backend="reference", **kw)
    out = outputs_and_grads(self_modifying_titans, inputs, backend="triton", **kw)
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-4)


@gpu
@needs_cuda
def test_gpu_hope_models_run_the_kernel_under_bf16_autocast(monkeypatch):
    """Under CUDA autocast a HOPE model (backend auto) runs its main memory on the kernels, and trains."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf")
    from kernels.self_modifying import autograd
    from nlplatform.models.hope import Hope, HopeConfig

    calls = count_calls(monkeypatch, autograd, "triton_main_memory")
    model = Hope(HopeConfig(d_model=256, n_layers=2, n_heads=2, vocab_size=100)).cuda()
    autocast_train_step(model, 100, length=512)
    # the model runs its layers window by window (one in-context CMS chunk each): one call per layer and window of
    # the 511 input tokens
    assert len(calls) == 2 * math.ceil(511 / model.fast_period)
