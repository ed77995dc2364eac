"""The Titans memory reference: the chunkwise form equals the token rule, reduces to the delta rule, and the op checks
its inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._testing import assert_close, err_ratio, leaves_of, state_outputs_and_grads
from kernels.delta_rule import gated_delta_rule
from kernels.titans_memory import (
    MemoryState,
    chunk_titans_memory,
    initial_memory_state,
    memory_read,
    recurrent_titans_memory,
    titans_memory,
)

B, H, K, V = 2, 2, 4, 3
GATES = ("theta", "eta", "alpha")


def make_inputs(T, hidden=(), *, theta_scale=0.2, momentum=False, dtype=torch.float64, seed=0):
    """Layer-like inputs: L2-normalised q and k, theta in [0, theta_scale), eta in [0, 1), alpha in [0, 0.2), learned
    initial weights [H, d_in, d_out] for an MLP K -> hidden... -> V, and (``momentum=True``) a non-zero initial
    momentum [B, H, d_in, d_out] as if carried from an earlier segment. All leaves require grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    dims = [K, *hidden, V]
    layers = list(zip(dims[:-1], dims[1:]))
    inputs = {
        "q": F.normalize(randn(B, T, H, K), dim=-1),
        "k": F.normalize(randn(B, T, H, K), dim=-1),
        "v": randn(B, T, H, V),
        "theta": theta_scale * rand(B, T, H),
        "eta": rand(B, T, H),
        "alpha": 0.2 * rand(B, T, H),
        "init_weights": [randn(H, a, b) / a**0.5 for a, b in layers],
        "init_momentum": [0.1 * randn(B, H, a, b) for a, b in layers] if momentum else None,
    }

    def leaf(x):
        if x is None:
            return None
        if isinstance(x, list):
            return [leaf(t) for t in x]
        return x.to(dtype).requires_grad_()

    return {n: leaf(x) for n, x in inputs.items()}


def state_of(inputs):
    """The MemoryState before the first token: the learned weights for every sequence, and the given momentum."""
    state = initial_memory_state(tuple(inputs["init_weights"]), B)
    if inputs["init_momentum"] is not None:
        state = MemoryState(state.weights, tuple(inputs["init_momentum"]))
    return state


def run(fn, inputs, **kwargs):
    args = [inputs[n] for n in ("q", "k", "v", *GATES)]
    if fn is titans_memory:
        return titans_memory(*args, state_of(inputs), **kwargs)
    return fn(*args, state_of(inputs), **kwargs)


def outputs_and_grads(fn, inputs, **kwargs):
    """y, the final weights and momentum, and the gradient of every leaf under a fixed random weighting of all
    outputs."""
    y, state = run(fn, inputs, **kwargs)
    return state_outputs_and_grads("y", y, state, inputs)


# (T, hidden widths, chunk size, activation, initial momentum): depths 1-3, both activations, odd lengths, chunk 1
# (the online rule) and chunks 4 and 16 (gradients at the chunk-start weights), partial last chunks everywhere.
CASES = [
    (7, (), 1, "gelu", False),
    (21, (5,), 1, "silu", True),
    (37, (5, 6), 1, "gelu", False),
    (21, (), 4, "silu", True),
    (37, (5,), 4, "gelu", False),
    (21, (5, 6), 4, "silu", True),
    (37, (), 16, "gelu", False),
    (37, (5,), 16, "silu", True),
    (37, (5, 6), 16, "gelu", True),
]


@pytest.mark.parametrize(
    ("T", "hidden", "chunk_size", "activation", "momentum"),
    CASES,
    ids=[f"T={t}-depth={len(h) + 1}-C={c}-{a}{'-S0' if m else ''}" for t, h, c, a, m in CASES],
)
def test_chunked_equals_the_token_rule_in_fp64_with_state_and_every_gradient(
    T, hidden, chunk_size, activation, momentum
):
    """The chunkwise form (closed-form gradients, [C, C] coefficient matrices) reproduces the token-by-token rule with
    autograd gradients at the same chunk size: y, final weights and momentum, and the gradients into q, k, v, theta,
    eta, alpha, the initial weights and the initial momentum, to 1e-10 relative RMS in fp64."""
    inputs = make_inputs(T, hidden, momentum=momentum)
    kw = {"chunk_size": chunk_size, "activation": activation}
    ref = outputs_and_grads(recurrent_titans_memory, inputs, **kw)
    out = outputs_and_grads(chunk_titans_memory, inputs, **kw)
    assert ref.keys() == out.keys()
    unwritten = memory_read(inputs["q"].transpose(1, 2), state_of(inputs).weights, activation).transpose(1, 2)
    assert err_ratio(unwritten, ref["y"]) > 1e-2  # the writes change what is read: the case exercises the update
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_clipped_inner_gradients_match_the_token_rule_and_bound_every_write(chunk_size):
    """With max_grad_norm, each token's whole gradient (all layers) is scaled to at most that norm, computed from the
    factors' norms in the chunked form and from the autograd gradients in the token rule: both agree (clipping active
    on most tokens), and a single write with eta = alpha = 0 moves the weights by at most theta * max_grad_norm."""
    inputs = make_inputs(21, (5,), theta_scale=0.5, momentum=True)
    kw = {"chunk_size": chunk_size, "max_grad_norm": 0.3}
    ref = outputs_and_grads(recurrent_titans_memory, inputs, **kw)
    out = outputs_and_grads(chunk_titans_memory, inputs, **kw)
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=1e-10)
    unclipped = outputs_and_grads(chunk_titans_memory, inputs, chunk_size=chunk_size)
    assert err_ratio(unclipped["y"], out["y"]) > 1e-3  # the clip is active
    one = {n: x for n, x in make_inputs(1, (5,)).items()}
    with torch.no_grad():
        one["eta"].zero_()
        one["alpha"].zero_()
        _, state = run(chunk_titans_memory, one, max_grad_norm=0.3)
        moved = sum((w - w0).pow(2).sum((-1, -2)) for w, w0 in zip(state.weights, state_of(one).weights)).sqrt()
    assert (moved <= one["theta"][:, 0] * 0.3 * (1 + 1e-9)).all()


@pytest.mark.parametrize("forgetting", [False, True], ids=["alpha=0", "alpha>0"])
def test_a_linear_memory_without_momentum_at_chunk_one_is_the_delta_rule(forgetting):
    """Depth 1, chunk 1, eta = 0: one gradient step on ||k^T W - v||^2 (gradient 2 k (W^T k - v)^T, no 1/2) is the delta
    rule with beta = 2 theta. With forgetting, M_t = (1 - alpha) M_{t-1} + 2 theta k (v - M_{t-1}^T k)^T is the gated
    rule with g = log(1 - alpha), beta = 2 theta / (1 - alpha) and values (1 - alpha) v. Outputs, final state and the
    gradients into q, k, v, theta, alpha and the initial weights agree."""
    T = 21
    inputs = make_inputs(T)
    with torch.no_grad():
        inputs["eta"].zero_()
        if not forgetting:
            inputs["alpha"].zero_()
    q, k, v, theta, alpha = (inputs[n] for n in ("q", "k", "v", "theta", "alpha"))
    (w0,) = inputs["init_weights"]
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    dw = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    wrt = [q, k, v, theta, alpha, w0] if forgetting else [q, k, v, theta, w0]

    y, state = titans_memory(q, k, v, theta, inputs["eta"], alpha, state_of(inputs), chunk_size=1)
    grads = torch.autograd.grad((y * dy).sum() + (state.weights[0] * dw).sum(), wrt)

    a = 1 - alpha
    delta = {"beta": 2 * theta / a, "g": torch.log(a), "v": a[..., None] * v} if forgetting else {"beta": 2 * theta}
    o, final = gated_delta_rule(
        q,
        k,
        delta.get("v", v),
        delta["beta"],
        delta.get("g"),
        scale=1.0,
        initial_state=w0.expand(B, H, K, V),
        output_final_state=True,
        chunk_size=4,
        backend="reference",
    )
    grads_ref = torch.autograd.grad((o * dy).sum() + (final * dw).sum(), wrt)

    assert_close("y", o, y, ratio=1e-12)
    assert_close("final weights", final, state.weights[0], ratio=1e-12)
    names = ["dq", "dk", "dv", "dtheta", "dalpha", "dW0"] if forgetting else ["dq", "dk", "dv", "dtheta", "dW0"]
    for name, ref, out in zip(names, grads_ref, grads):
        assert_close(name, ref, out, ratio=1e-12)


@pytest.mark.parametrize("hidden", [(), (5,)], ids=["depth=1", "depth=2"])
def test_the_chunk_size_changes_the_model_unlike_the_delta_rule_tiling(hidden):
    """Gradients taken at the chunk-start weights are not the online ones: chunk 1 and chunk 4 give outputs that differ
    by far more than rounding (the delta rule's chunk size is only a tiling). With theta = 0 nothing is learned and the
    chunk size is irrelevant."""
    inputs = make_inputs(21, hidden)
    y1, _ = run(chunk_titans_memory, inputs, chunk_size=1)
    y4, _ = run(chunk_titans_memory, inputs, chunk_size=4)
    assert err_ratio(y1, y4) > 1e-3
    with torch.no_grad():
        inputs["theta"].zero_()
    y1, s1 = run(chunk_titans_memory, inputs, chunk_size=1)
    y4, s4 = run(chunk_titans_memory, inputs, chunk_size=4)
    assert_close("y (theta = 0)", y1, y4, ratio=1e-13)
    for i, (a, b) in enumerate(zip(s1.weights, s4.weights)):
        assert_close(f"W[{i}] (theta = 0)", a, b, ratio=1e-13)


def _slice(inputs, sl):
    return {n: (x[:, sl] if n in ("q", "k", "v", *GATES) else x) for n, x in inputs.items()}


@pytest.mark.parametrize(("chunk_size", "split"), [(1, 13), (4, 12), (16, 16)])
def test_splitting_at_a_chunk_boundary_and_carrying_the_state_changes_nothing(chunk_size, split):
    """Running [0, t) then [t, T) from the returned state (weights and momentum) gives the one-call run when t is a
    multiple of the chunk size (what decoding and segment-wise training rely on)."""
    T = 29
    inputs = make_inputs(T, (5,), momentum=True)
    y_full, s_full = run(titans_memory, inputs, chunk_size=chunk_size)
    y1, s1 = run(titans_memory, _slice(inputs, slice(0, split)), chunk_size=chunk_size)
    rest = _slice(inputs, slice(split, T))
    args = [rest[n] for n in ("q", "k", "v", *GATES)]
    y2, s2 = titans_memory(*args, s1, chunk_size=chunk_size)
    assert_close("y", y_full, torch.cat([y1, y2], dim=1), ratio=1e-13)
    for i in range(2):
        assert_close(f"W[{i}]", s_full.weights[i], s2.weights[i], ratio=1e-13)
        assert_close(f"S[{i}]", s_full.momentum[i], s2.momentum[i], ratio=1e-13)


def test_a_split_inside_a_chunk_starts_a_new_chunk():
    """Carrying the state across a split that is not chunk-aligned equals the token rule whose chunks restart at the
    split, not the one-call run: the chunk grid is part of the model."""
    T, C, split = 20, 4, 6
    inputs = make_inputs(T, (5,))
    y_full, _ = run(chunk_titans_memory, inputs, chunk_size=C)
    y1, s1 = run(chunk_titans_memory, _slice(inputs, slice(0, split)), chunk_size=C)
    rest = _slice(inputs, slice(split, T))
    y2, _ = chunk_titans_memory(*[rest[n] for n in ("q", "k", "v", *GATES)], s1, chunk_size=C)
    y2_ref, _ = recurrent_titans_memory(*[rest[n] for n in ("q", "k", "v", *GATES)], s1, chunk_size=C)
    assert_close("y after the split", y2_ref, y2, ratio=1e-12)
    assert err_ratio(y_full[:, split:], y2) > 1e-4


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_alpha_one_clears_the_memory_to_the_momentum(chunk_size):
    """alpha_t = 1 forgets everything before token t: M_t = S_t exactly, also in the middle of a chunk (the segment
    products through a zero factor are exact zeros)."""
    t = 5
    inputs = make_inputs(t + 1, (5,), momentum=True)
    with torch.no_grad():
        inputs["alpha"][:, t] = 1.0
    for fn in (recurrent_titans_memory, chunk_titans_memory):
        _, state = run(fn, inputs, chunk_size=chunk_size)
        for i, (w, s) in enumerate(zip(state.weights, state.momentum)):
            torch.testing.assert_close(w, s, rtol=1e-12, atol=1e-300, msg=f"{fn.__name__}: W[{i}] != S[{i}]")
            assert s.abs().max() > 1e-3


def test_without_learning_rate_or_momentum_the_memory_stays_put():
    """eta = 0, theta = 0, alpha = 0: the carried momentum is dropped, no gradient is written, so the weights stay the
    initial ones and every token reads M_0(q_t). With eta = 1 instead, the momentum drifts the weights:
    M_t = M_0 + t S_0."""
    T = 11
    inputs = make_inputs(T, (5, 6), momentum=True)
    with torch.no_grad():
        for n in GATES:
            inputs[n].zero_()
    w0 = state_of(inputs).weights
    y, state = run(titans_memory, inputs, chunk_size=4)
    for i, w in enumerate(w0):
        torch.testing.assert_close(state.weights[i], w, rtol=0, atol=0, msg=f"W[{i}] moved")
        assert state.momentum[i].abs().max() == 0
    read = memory_read(inputs["q"].transpose(1, 2), w0).transpose(1, 2)
    torch.testing.assert_close(y, read, rtol=1e-13, atol=1e-15)

    with torch.no_grad():
        inputs["eta"].fill_(1.0)
    _, state = run(titans_memory, inputs, chunk_size=4)
    for i, (w, s) in enumerate(zip(w0, inputs["init_momentum"])):
        torch.testing.assert_close(state.weights[i], w + T * s, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(state.momentum[i], s, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_each_token_reads_the_memory_after_its_own_update(activation):
    """y_t = M_t(q_t) with M_t the state after token t (read-after-write), here in the middle of a chunk: memory_read
    on the state returned for the first t + 1 tokens gives the op's y_t."""
    t, C = 6, 4
    inputs = make_inputs(15, (5, 6))
    y, _ = run(titans_memory, inputs, chunk_size=C, activation=activation)
    _, state_t = run(titans_memory, _slice(inputs, slice(0, t + 1)), chunk_size=C, activation=activation)
    read = memory_read(inputs["q"][:, t, :, None, :], state_t.weights, activation).squeeze(2)
    torch.testing.assert_close(read, y[:, t], rtol=1e-12, atol=1e-14)
    _, state_before = run(titans_memory, _slice(inputs, slice(0, t)), chunk_size=C, activation=activation)
    stale = memory_read(inputs["q"][:, t, :, None, :], state_before.weights, activation).squeeze(2)
    assert err_ratio(y[:, t], stale) > 1e-4  # the token's own write matters


@pytest.mark.parametrize("form", ["recurrent", "chunked"])
def test_gradcheck_on_a_tiny_fp64_case(form):
    """Autograd through either form (depth 2, chunk 2, T = 5, with initial momentum) matches finite differences
    (gradcheck's fast mode: random projections of the Jacobian, to stay within the time budget of a CPU test run)."""
    inputs = make_inputs(5, (4,), theta_scale=0.5, momentum=True)
    leaves = leaves_of(inputs)
    fn_ = recurrent_titans_memory if form == "recurrent" else chunk_titans_memory

    def fn(q, k, v, theta, eta, alpha, w1, w2, s1, s2):
        state = MemoryState(tuple(initial_memory_state((w1, w2), B).weights), (s1, s2))
        y, final = fn_(q, k, v, theta, eta, alpha, state, chunk_size=2, activation="gelu")
        return (y, *final.weights, *final.momentum)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), fast_mode=True)


def test_fp32_chunked_tracks_the_fp64_ground_truth():
    """In fp32 the chunked form (chunk 16, depth 2) stays within 2e-5 relative RMS of the fp64 token rule, on y, the
    final state and every gradient."""
    inputs64 = make_inputs(37, (8,), theta_scale=0.1, momentum=True)
    inputs32 = make_inputs(37, (8,), theta_scale=0.1, momentum=True, dtype=torch.float32)
    ref = outputs_and_grads(recurrent_titans_memory, inputs64, chunk_size=16)
    out = outputs_and_grads(chunk_titans_memory, inputs32, chunk_size=16)
    assert out["y"].dtype == torch.float32
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_output_keeps_v_dtype_and_the_state_is_at_least_fp32(dtype):
    """y comes back in v's dtype; the state is fp32 for bf16/fp32 inputs and fp64 for fp64."""
    inputs = make_inputs(9, (5,), dtype=dtype)
    for fn in (recurrent_titans_memory, chunk_titans_memory):
        y, state = run(fn, inputs, chunk_size=4)
        assert y.dtype == dtype
        for x in (*state.weights, *state.momentum):
            assert x.dtype == torch.promote_types(dtype, torch.float32)


def test_the_token_rule_runs_under_no_grad_and_refuses_inference_mode_by_name():
    """The token rule (the ground truth) runs under no_grad like the op; under inference_mode, where autograd cannot
    take its inner gradients, it says so."""
    inputs = make_inputs(5, (5,))
    params = [torch.nn.Parameter(w.detach()) for w in inputs["init_weights"]]
    args = [inputs[n].detach() for n in ("q", "k", "v", *GATES)]
    y_ref, _ = recurrent_titans_memory(*args, initial_memory_state(tuple(params), B))
    with torch.no_grad():
        y, _ = recurrent_titans_memory(*args, initial_memory_state(tuple(params), B))
    torch.testing.assert_close(y, y_ref)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside inference_mode"):
        recurrent_titans_memory(*args, initial_memory_state(tuple(params), B))


@pytest.mark.parametrize(("gate", "value"), [("eta", 0.0), ("eta", 1e-14), ("alpha", 1.0)])
def test_gate_gradients_at_the_ends_of_their_range_match_the_token_rule(gate, value):
    """Where eta_t = 0 (or 1 - alpha_t = 0) the forward is exact, and the gradient into that gate should still be the
    token rule's (eta_t multiplies S_{t-1}, which is not zero)."""
    inputs = make_inputs(13, (5,), momentum=True)
    with torch.no_grad():
        inputs[gate][:, 3] = value
    ref = outputs_and_grads(recurrent_titans_memory, inputs, chunk_size=1)
    out = outputs_and_grads(chunk_titans_memory, inputs, chunk_size=1)
    assert_close(f"d{gate}", ref[f"d{gate}"], out[f"d{gate}"], ratio=1e-8)


def _bad(T=8, hidden=(5,), **changes):
    inputs = make_inputs(T, hidden, dtype=torch.float32)
    args = {n: inputs[n].detach() for n in ("q", "k", "v", *GATES)}
    args["state"] = initial_memory_state(tuple(w.detach() for w in inputs["init_weights"]), B)
    args.update(changes)
    return args


def _state(*layers, momenta=None):
    """A zero state with per-layer (d_in, d_out) and the first ``momenta`` momentum tensors (all by default)."""
    weights = tuple(torch.zeros(B, H, a, b) for a, b in layers)
    return MemoryState(weights, tuple(torch.zeros_like(w) for w in weights[: momenta or len(weights)]))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"q": torch.randn(B, 8, H)}, ValueError, r"q must be \[B, T, H, K\]"),
        ({"k": torch.randn(B, 8, H, K + 1)}, ValueError, "k must have q's shape"),
        ({"v": torch.randn(B, 7, H, V)}, ValueError, r"v must be \[B, T, H, V\]"),
        ({"theta": torch.rand(B, 8, H, 1)}, ValueError, r"theta must be \[B, T, H\]"),
        ({"eta": torch.rand(B, 8)}, ValueError, r"eta must be \[B, T, H\]"),
        ({"alpha": torch.rand(B, 9, H)}, ValueError, r"alpha must be \[B, T, H\]"),
        ({"q": torch.randn(B, 0, H, K), "k": torch.randn(B, 0, H, K)}, ValueError, "empty"),
        ({"state": (torch.zeros(B, H, K, V),)}, TypeError, "MemoryState.*initial_memory_state"),
        ({"state": _state((K, 5), (5, V), momenta=1)}, ValueError, "2 weights but 1 momenta"),
        (
            {"state": _state((K + 1, 5), (5, V))},
            ValueError,
            r"layer 0 must be \[B, H, d_in, d_out\] = \[2, 2, 4, d_out\]",
        ),
        ({"state": _state((K, 5), (6, V))}, ValueError, r"layer 1 must be \[B, H, d_in, d_out\] = \[2, 2, 5, d_out\]"),
        ({"state": _state((K, 5), (5, V + 2))}, ValueError, "last layer outputs 5 values per head but v has 3"),
    ],
    ids=[
        "q-rank",
        "k-shape",
        "v-length",
        "theta-shape",
        "eta-rank",
        "alpha-length",
        "T=0",
        "not-a-state",
        "momentum-count",
        "layer0-d_in!=K",
        "layers-do-not-chain",
        "d_out!=V",
    ],
)
def test_bad_inputs_get_an_error_that_names_the_fix(changes, error, match):
    """Wrong shapes, a state whose layers do not chain from K to V, or an empty sequence fail with a message naming
    the expected layout."""
    args = _bad(**changes)
    with pytest.raises(error, match=match):
        titans_memory(**args)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_chunk_size_must_be_a_positive_int(chunk_size):
    """A chunk size that is not a positive int (bools included) is refused."""
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        titans_memory(**_bad(), chunk_size=chunk_size)


def test_unknown_activations_and_backends_are_refused_with_the_choices():
    """An activation other than gelu/silu, or a backend the op does not have, fails with the list of what exists;
    backend="reference" and "auto" both run."""
    with pytest.raises(ValueError, match=r"activation must be one of \('gelu', 'silu'\)"):
        titans_memory(**_bad(), activation="relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        titans_memory(**_bad(), backend="cuda")
    with pytest.raises(ValueError, match="does not take dtype torch.float64|available: reference"):
        titans_memory(**{n: x.double() if torch.is_tensor(x) else x for n, x in _bad().items()}, backend="triton")
    y_ref, _ = titans_memory(**_bad(), backend="reference")
    y_auto, _ = titans_memory(**_bad(), backend="auto")
    torch.testing.assert_close(y_auto, y_ref, rtol=0, atol=0)
