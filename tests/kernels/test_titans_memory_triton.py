"""The Triton backend of the Titans memory equals the PyTorch reference on the read-out, the final weights and momentum
and every gradient, for depth-1 and depth-2 memories.

On a CPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by tests/conftest.py): fp32 and fp16
only (the interpreter gets bf16 wrong), small shapes. The ``gpu`` tests take bf16 and fp32 at realistic shapes on a
CUDA device (``pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._dispatch import triton_interpreted
from kernels._testing import (
    assert_backends_agree,
    assert_close,
    autocast_train_step,
    count_calls,
    state_outputs_and_grads,
)
from kernels.titans_memory import AVAILABLE_BACKENDS, MemoryState, initial_memory_state, titans_memory
from tests.kernels.test_delta_rule_triton import poisoned_allocations  # noqa: F401 (autouse: NaN-filled allocations)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative RMS error allowed against the reference run on the same inputs. fp32: IEEE products, another summation
# order. fp16/bf16: the kernels multiply roundings of their float32 tiles (the state included) to the input's half
# type, as the tensor cores take them; the state itself is accumulated in float32.
RATIO = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

pytestmark = [
    pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="triton is not installed"),
    pytest.mark.skipif(
        DEVICE == "cpu" and not triton_interpreted(),
        reason="no CUDA device and TRITON_INTERPRET is not set (tests/conftest.py sets it when CUDA is absent)",
    ),
]


def make_inputs(B, T, H, K, V, hidden, dtype, *, theta_max=0.2, seed=0, device=DEVICE):
    """Layer-like inputs: L2-normalised q and k, theta in [0, theta_max), eta in [0, 1), alpha in [0, 0.2), learned
    initial weights [H, d_in, d_out] for a memory K -> hidden -> V (``hidden=None``: depth 1) and a non-zero initial
    momentum, as if carried from an earlier segment. Every tensor is a leaf that requires grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    dims = [K, V] if hidden is None else [K, hidden, V]
    layers = list(zip(dims[:-1], dims[1:]))
    inputs = {
        "q": F.normalize(randn(B, T, H, K), dim=-1),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "theta": theta_max * torch.rand(B, T, H, generator=gen),
        "eta": torch.rand(B, T, H, generator=gen),
        "alpha": 0.2 * torch.rand(B, T, H, generator=gen),
        "init_weights": [randn(H, a, b) / a**0.5 for a, b in layers],
        "init_momentum": [0.1 * randn(B, H, a, b) for a, b in layers],
    }
    return {
        n: [t.to(device, dtype).requires_grad_() for t in x]
        if isinstance(x, list)
        else x.to(device, dtype).requires_grad_()
        for n, x in inputs.items()
    }


def outputs_and_grads(inputs, backend, **kwargs):
    """y, final weights and momentum, and the gradient of every leaf under one fixed random weighting of them all."""
    B = inputs["q"].shape[0]
    state = MemoryState(initial_memory_state(tuple(inputs["init_weights"]), B).weights, tuple(inputs["init_momentum"]))
    args = [inputs[n] for n in ("q", "k", "v", "theta", "eta", "alpha")]
    y, final = titans_memory(*args, state, backend=backend, **kwargs)
    return state_outputs_and_grads("y", y, final, inputs)


def assert_all_close(ref, out, ratio):
    assert ref.keys() == out.keys()
    for name in ref:
        assert out[name].dtype == ref[name].dtype, name
        assert_close(name, ref[name], out[name], ratio)


CASES = [
    # B, T, H, K, V, hidden (None: depth 1), chunk size, activation, max_grad_norm, dtype
    (1, 7, 1, 16, 16, None, 16, "gelu", None, torch.float32),  # one partial chunk
    (2, 21, 2, 16, 16, None, 4, "silu", 0.5, torch.float32),
    (2, 37, 2, 16, 16, 64, 16, "gelu", 0.5, torch.float32),
    (1, 40, 2, 12, 20, 80, 8, "silu", None, torch.float32),  # widths below the tiles, not powers of two
    (1, 70, 1, 16, 16, 32, 64, "gelu", 1.0, torch.float32),  # the largest chunk, a partial last one
    (2, 5, 1, 16, 16, 32, 1, "gelu", None, torch.float32),  # chunk 1: the exact online rule
    (1, 33, 2, 16, 16, 64, 16, "gelu", 1.0, torch.float16),
    (2, 24, 1, 16, 32, None, 8, "silu", None, torch.float16),
]


@pytest.mark.parametrize(
    ("B", "T", "H", "K", "V", "hidden", "chunk_size", "activation", "max_grad_norm", "dtype"),
    [
        pytest.param(
            *c,
            id="B{}-T{}-H{}-K{}-V{}-{}-C{}-{}-{}-{}".format(
                *c[:5],
                "depth1" if c[5] is None else f"hidden{c[5]}",
                c[6],
                c[7],
                "noclip" if c[8] is None else f"clip{c[8]}",
                str(c[9])[6:],
            ),
        )
        for c in CASES
    ],
)
@pytest.mark.slow
def test_triton_equals_the_reference_on_output_state_momentum_and_every_gradient(
    B, T, H, K, V, hidden, chunk_size, activation, max_grad_norm, dtype
):
    """y, the final weights and momentum of every layer, and the gradients into q, k, v, theta, eta, alpha, the learned
    initial weights (through the batch expansion) and the initial momentum match the reference."""
    inputs = make_inputs(B, T, H, K, V, hidden, dtype)
    kw = dict(chunk_size=chunk_size, activation=activation, max_grad_norm=max_grad_norm)
    ref = outputs_and_grads(inputs, "reference", **kw)
    out = outputs_and_grads(inputs, "triton", **kw)
    assert_all_close(ref, out, RATIO[dtype])


@pytest.mark.slow
def test_the_clip_is_active_in_the_clipped_cases_and_changes_the_result():
    """The clipped cases above test the clip's backward only if some tokens are clipped: at max_grad_norm 0.5 the
    result differs from the unclipped one, and both backends agree on each."""
    inputs = make_inputs(1, 37, 2, 16, 16, 64, torch.float32)
    kw = dict(chunk_size=16, activation="gelu")
    clipped = outputs_and_grads(inputs, "triton", max_grad_norm=0.5, **kw)
    plain = outputs_and_grads(inputs, "triton", max_grad_norm=None, **kw)
    assert (clipped["W[0]"] - plain["W[0]"]).abs().max() > 1e-3


def test_a_state_carried_across_calls_at_a_chunk_boundary_continues_the_sequence():
    """Two calls split at a chunk boundary, the state of the first passed to the second, equal one call."""
    inputs = make_inputs(1, 48, 2, 16, 16, 32, torch.float32)
    args = [inputs[n].detach() for n in ("q", "k", "v", "theta", "eta", "alpha")]
    state = initial_memory_state(tuple(w.detach() for w in inputs["init_weights"]), 1)
    kw = dict(chunk_size=16, max_grad_norm=1.0, backend="triton")
    y, final = titans_memory(*args, state, **kw)
    y1, mid = titans_memory(*(a[:, :32] for a in args), state, **kw)
    y2, end = titans_memory(*(a[:, 32:] for a in args), mid, **kw)
    assert_close("y", y, torch.cat([y1, y2], 1), 1e-6)
    for a, b in zip(final.weights + final.momentum, end.weights + end.momentum):
        assert_close("state", a, b, 1e-6)


@pytest.mark.parametrize(
    ("hidden", "chunk_size", "dtype", "match"),
    [
        ((8, 8), 16, torch.float32, "depth-3 memory"),
        (32, 65, torch.float32, "chunk_size=65"),
        (32, 16, torch.float64, "dtype torch.float64"),
    ],
    ids=["depth3", "chunk65", "fp64"],
)
def test_inputs_the_kernels_do_not_take_are_refused_by_name_on_the_triton_backend(hidden, chunk_size, dtype, match):
    """backend='triton' on what the kernels cannot run is a ValueError naming the reason; 'auto' runs the reference."""
    K = 16
    dims = [K, *hidden, K] if isinstance(hidden, tuple) else [K, hidden, K]
    q = F.normalize(torch.randn(1, 20, 1, K, dtype=dtype, device=DEVICE), dim=-1)
    gates = [torch.rand(1, 20, 1, dtype=dtype, device=DEVICE) * 0.1 for _ in range(3)]
    weights = tuple(torch.randn(1, a, b, dtype=dtype, device=DEVICE) / a**0.5 for a, b in zip(dims[:-1], dims[1:]))
    state = initial_memory_state(weights, 1)
    with pytest.raises(ValueError, match=f"Triton backend does not take.*{match}"):
        titans_memory(q, q, q, *gates, state, chunk_size=chunk_size, backend="triton")
    y, _ = titans_memory(q, q, q, *gates, state, chunk_size=chunk_size, backend="auto")
    assert torch.isfinite(y).all()


def test_auto_keeps_chunks_that_crashed_a_gpu_on_the_reference_and_triton_still_runs_them():
    """Chunks above AUTO_MAX_CHUNK (chunk 64 hit an illegal memory access on an H200) are taken by the kernels but kept
    off them under 'auto'; an explicit 'triton' runs them (the GPU check that clears them needs that), and chunks up
    to the bound stay on the kernels under 'auto'."""
    from kernels._dispatch import takes_inputs
    from kernels.self_modifying import autograd as hope_autograd
    from kernels.titans_memory import autograd

    assert autograd.unverified(autograd.AUTO_MAX_CHUNK) is None
    why = autograd.unverified(64)
    assert "chunk_size=64" in why and "out of bounds" in why
    assert hope_autograd.unverified is autograd.unverified  # one record for the kernels both ops run
    assert takes_inputs("titans_memory", "auto", None, why) is False
    assert takes_inputs("titans_memory", "triton", None, why) is True
    assert takes_inputs("titans_memory", "auto", None, autograd.unverified(16)) is True


@pytest.mark.slow
def test_a_titans_model_on_the_triton_backend_equals_the_reference_model():
    """The model wiring: Titans (memory only, and memory as a gate) logits and weight gradients agree across backends."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf (GPU machines may lack it)")
    from nlplatform.models.titans import Titans, TitansConfig

    small = dict(d_model=32, n_layers=1, n_heads=2, vocab_size=50, memory_chunk_size=8, window=16, attn_heads=2)
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for variant in ("lmm", "mag"):
        assert_backends_agree(
            variant,
            lambda backend, variant=variant: Titans(TitansConfig(**small, variant=variant, kernel_backend=backend)),
            ids,
        )


# ---- GPU: bf16 and fp32 at realistic shapes (pytest -m gpu on a CUDA machine) ----

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "B", "T", "H", "K", "hidden", "chunk_size"),
    [
        (torch.bfloat16, 2, 4096, 8, 128, 512, 64),  # the 340m Titans memory
        (torch.bfloat16, 2, 1000, 4, 64, 256, 16),
        (torch.bfloat16, 2, 2048, 4, 128, None, 64),
        (torch.float32, 1, 2048, 4, 64, 256, 64),
        (torch.float32, 1, 1000, 4, 128, 512, 32),
    ],
    ids=["bf16-340m", "bf16-C16", "bf16-depth1", "fp32-K64", "fp32-C32"],
)
def test_gpu_triton_tracks_the_fp32_reference(dtype, B, T, H, K, hidden, chunk_size):
    """On a GPU: the kernels in bf16/fp32 against the reference run in fp32 on the same (rounded) inputs."""
    inputs = make_inputs(B, T, H, K, K, hidden, dtype, theta_max=0.1)
    ref_inputs = {
        n: [t.detach().float().requires_grad_() for t in x]
        if isinstance(x, list)
        else x.detach().float().requires_grad_()
        for n, x in inputs.items()
    }
    kw = dict(chunk_size=chunk_size, max_grad_norm=1.0)
    ref = outputs_and_grads(ref_inputs, "reference", **kw)
    out = outputs_and_grads(inputs, "triton", **kw)
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-4 if dtype == torch.float32 else RATIO[dtype])


@gpu
@needs_cuda
def test_gpu_titans_models_run_the_kernel_under_bf16_autocast(monkeypatch):
    """Under CUDA autocast the Titans model hands the kernel one dtype (backend auto picks Triton), and trains."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf")
    from kernels.titans_memory import autograd
    from nlplatform.models.titans import Titans, TitansConfig

    calls = count_calls(monkeypatch, autograd, "triton_titans_memory")
    model = Titans(TitansConfig(d_model=256, n_layers=2, n_heads=2, vocab_size=100, memory_chunk_size=16)).cuda()
    autocast_train_step(model, 100)
    assert len(calls) == 2


@gpu
@needs_cuda
def test_gpu_titans_models_train_on_the_kernel_at_chunk_64_when_asked(monkeypatch):
    """The configuration that hit an illegal memory access on an H200 (the 340m preset's chunk 64), run explicitly on
    the kernels: passing clears it (then raise autograd.AUTO_MAX_CHUNK)."""
    pytest.importorskip("omegaconf", reason="the model configs need omegaconf")
    from kernels.titans_memory import autograd
    from nlplatform.models.titans import Titans, TitansConfig

    calls = count_calls(monkeypatch, autograd, "triton_titans_memory")
    cfg = TitansConfig(
        d_model=256, n_layers=2, n_heads=2, vocab_size=100, memory_chunk_size=64, kernel_backend="triton"
    )
    autocast_train_step(Titans(cfg).cuda(), 100)
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("T", "hidden", "chunk_size"), [(29, 64, 4), (40, None, 8), (5, 32, 1)], ids=["depth2-C4", "depth1-C8", "C1"]
)
@pytest.mark.slow
def test_recomputing_segment_states_in_the_backward_changes_nothing(monkeypatch, T, hidden, chunk_size):
    """Beyond KEEP_ALL_CHUNKS chunks the forward keeps only every R-th chunk-start state and the backward recomputes
    each segment's: forced here (and with a last segment shorter than the others), every output and gradient equals
    the reference's."""
    from kernels.titans_memory import autograd

    monkeypatch.setattr(autograd, "KEEP_ALL_CHUNKS", 1)
    inputs = make_inputs(2, T, 2, 16, 16, hidden, torch.float32)
    kw = dict(chunk_size=chunk_size, activation="gelu", max_grad_norm=1.0)
    ref = outputs_and_grads(inputs, "reference", **kw)
    out = outputs_and_grads(inputs, "triton", **kw)
    assert_all_close(ref, out, RATIO[torch.float32])


def test_without_autograd_the_kernels_give_the_same_read_out_and_state():
    """Under no_grad and inference_mode (evaluation, generation) the Triton backend runs forward only and returns
    what it returns with autograd."""
    inputs = make_inputs(1, 21, 2, 16, 16, 32, torch.float32)
    args = [inputs[n].detach() for n in ("q", "k", "v", "theta", "eta", "alpha")]
    state = initial_memory_state(tuple(w.detach() for w in inputs["init_weights"]), 1)
    kw = dict(chunk_size=8, max_grad_norm=1.0, backend="triton")
    y, final = titans_memory(*args, state, **kw)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y2, final2 = titans_memory(*args, state, **kw)
        assert torch.equal(y, y2)
        assert all(torch.equal(a, b) for a, b in zip(final.weights + final.momentum, final2.weights + final2.momentum))


@pytest.mark.slow
@pytest.mark.skipif(not triton_interpreted(), reason="checks the CPU interpreter's accesses (TRITON_INTERPRET=1)")
@pytest.mark.parametrize(("T", "K", "chunk_size"), [(200, 64, 64), (100, 128, 16)], ids=["C64-K64", "C16-K128"])
def test_every_kernel_access_stays_inside_the_launch_tensors(T, K, chunk_size):
    """The forward and backward kernels, run by the interpreter with every load and store checked against the storages
    of the launch's tensors, at the shapes of the H200 failure (chunk 64, a partial last chunk) and of the model
    default (chunk 16, K = 128): no access leaves them (a GPU's illegal memory access needs one that does, or a
    compiler fault)."""
    from tests.kernels.bounds import checked_bounds

    inputs = make_inputs(1, T, 1, K, K, 2 * K, torch.float16)
    with checked_bounds():
        out = outputs_and_grads(inputs, "triton", chunk_size=chunk_size, max_grad_norm=1.0)
    assert all(torch.isfinite(t).all() for t in out.values())
