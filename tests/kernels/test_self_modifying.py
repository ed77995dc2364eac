"""The self-modifying Titans reference: the chunked form equals the token rule, chunk 1 is the paper's per-token rule,
each ablation does what it says, reads are causal, and the op checks its inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._testing import assert_close, err_ratio, state_outputs_and_grads
from kernels.self_modifying import (
    SelfModState,
    chunk_self_modifying_titans,
    initial_self_mod_state,
    memory_names,
    recurrent_self_modifying_titans,
    self_modifying_titans,
)

B, H, K, HIDDEN = 2, 2, 4, 6
ETA_MAX = 0.1  # the op's default: larger rates make the stale in-chunk gradients of depth-1 memories diverge
SEQ = ("x", "q", "static_k", "static_v")


def make_inputs(T, depth, *, static_k=False, static_v=False, init_momentum=False, dtype=torch.float64, seed=0):
    """Layer-like inputs: generator inputs x, L2-normalised queries, gate projections (retention around 0.9), a
    per-head momentum decay, learned initial weights [M, H, d_in, d_out] for every memory of the stack, optional static
    keys (normalised) and values, and optionally a non-zero initial momentum as if carried from an earlier segment.
    All leaves require grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    M = len(memory_names(static_k, static_v))
    dims = [K, HIDDEN, K] if depth == 2 else [K, K]
    layers = list(zip(dims[:-1], dims[1:]))
    inputs = {
        "x": F.normalize(randn(B, T, H, K), dim=-1),
        "q": F.normalize(randn(B, T, H, K), dim=-1),
        "gate_w": 0.5 * randn(2, H, K),
        "gate_b": 0.3 * randn(2, H) + torch.tensor([[0.0], [2.0]], dtype=torch.float64),
        "momentum_decay": 0.9 * torch.rand(H, generator=gen, dtype=torch.float64),
        "init_weights": [0.5 * randn(M, H, a, b) / a**0.5 for a, b in layers],
        "init_momentum": [0.05 * randn(B, M, H, a, b) for a, b in layers] if init_momentum else None,
        "static_k": F.normalize(randn(B, T, H, K), dim=-1) if static_k else None,
        "static_v": randn(B, T, H, K) if static_v else None,
    }

    def leaf(x):
        if x is None:
            return None
        if isinstance(x, list):
            return [leaf(t) for t in x]
        return x.to(dtype).requires_grad_()

    return {n: leaf(x) for n, x in inputs.items()}


def state_of(inputs):
    state = initial_self_mod_state(tuple(inputs["init_weights"]), inputs["x"].shape[0])
    if inputs["init_momentum"] is not None:
        state = SelfModState(state.weights, tuple(inputs["init_momentum"]))
    return state


def run(fn, inputs, state=None, **kwargs):
    kwargs = {
        "eta_max": ETA_MAX,
        "static_k": inputs["static_k"],
        "static_v": inputs["static_v"],
        "momentum_decay": inputs["momentum_decay"],
        **kwargs,
    }
    state = state_of(inputs) if state is None else state
    return fn(inputs["x"], inputs["q"], inputs["gate_w"], inputs["gate_b"], state, **kwargs)


def outputs_and_grads(fn, inputs, **kwargs):
    """o, the final weights and momentum, and the gradient of every leaf under a fixed random weighting of all
    outputs."""
    o, state = run(fn, inputs, **kwargs)
    return state_outputs_and_grads("o", o, state, inputs, allow_unused=True)


def _slice(inputs, sl):
    return {n: (x[:, sl] if n in SEQ and x is not None else x) for n, x in inputs.items()}


def paper_rule(inputs, *, dgd=True, retention=True, momentum=False):
    """The per-token rule of a depth-1 memory at chunk 1, written out with explicit [K, K] matrices: each memory is
    M(z) = z + z W; generators read from W_{t-1}; every memory regresses its own value vhat = v + v W on k with gradient
    2 k^T (k + k W - vhat); without momentum the write is Eq. 88, W_t = (alpha I - eta k^T k) W_{t-1} - eta grad (row
    convention, k normalised), with momentum S_t = beta S_{t-1} - eta (grad + k^T k W), W_t = alpha W_{t-1} + S_t.
    Returns the outputs, the final weights [B, M, H, K, K] and the keys and values used."""
    names = memory_names(inputs["static_k"] is not None, inputs["static_v"] is not None)
    x, q, gw, gb = (inputs[n].detach() for n in ("x", "q", "gate_w", "gate_b"))
    W = [inputs["init_weights"][0].detach()[m].expand(B, H, K, K).clone() for m in range(len(names))]
    S = [torch.zeros_like(w) for w in W]
    beta = inputs["momentum_decay"].detach()[:, None, None] if momentum else None
    eye = torch.eye(K, dtype=x.dtype)
    outs, keys, values = [], [], []
    for t in range(x.shape[1]):
        gen = {name: x[:, t] + torch.einsum("bhi,bhij->bhj", x[:, t], W[m]) for m, name in enumerate(names)}
        k = inputs["static_k"].detach()[:, t] if inputs["static_k"] is not None else F.normalize(gen["k"], dim=-1)
        v = inputs["static_v"].detach()[:, t] if inputs["static_v"] is not None else gen["v"]
        eta = ETA_MAX * torch.sigmoid((gen["eta"] * gw[0]).sum(-1) + gb[0])[..., None, None]
        alpha = torch.sigmoid((gen["alpha"] * gw[1]).sum(-1) + gb[1])[..., None, None] if retention else 1.0
        outs.append(q[:, t] + torch.einsum("bhi,bhij->bhj", q[:, t], W[0]))
        keys.append(k)
        values.append(v)
        kn = F.normalize(k, dim=-1)
        kk = torch.einsum("bhi,bhj->bhij", kn, kn) if dgd else torch.zeros(B, H, K, K, dtype=x.dtype)
        for m in range(len(names)):
            vhat = v + torch.einsum("bhi,bhij->bhj", v, W[m])
            err = k + torch.einsum("bhi,bhij->bhj", k, W[m]) - vhat
            grad = 2 * torch.einsum("bhi,bhj->bhij", k, err)
            if momentum:
                S[m] = beta * S[m] - eta * (grad + kk @ W[m])
                W[m] = alpha * W[m] + S[m]
            else:
                W[m] = (alpha * eye - eta * kk) @ W[m] - eta * grad
    return torch.stack(outs, 1), torch.stack(W, 1), torch.stack(keys, 1), torch.stack(values, 1)


# (C_gen, C_mem, depth, T, activation, options): every chunk pairing at both depths, odd lengths so the last
# sub-chunk is partial, and the ablations, clipping, static keys/values and a carried momentum on top
CASES = [
    (1, 1, 1, 7, "gelu", {}),
    (1, 1, 2, 7, "silu", {"init_momentum": True}),
    (4, 4, 1, 33, "gelu", {"init_momentum": True}),
    (4, 4, 2, 33, "gelu", {}),
    (4, 8, 1, 33, "silu", {}),
    (4, 8, 2, 33, "gelu", {"init_momentum": True}),
    (8, 4, 1, 33, "gelu", {"init_momentum": True}),
    (8, 4, 2, 33, "silu", {}),
    (16, 16, 1, 33, "gelu", {}),
    (16, 16, 2, 33, "gelu", {"init_momentum": True}),
    (4, 8, 2, 21, "gelu", {"static_k": True, "static_v": True}),
    (8, 4, 2, 21, "gelu", {"static_v": True, "max_grad_norm": 0.5}),
    (4, 8, 2, 21, "gelu", {"dgd": False, "retention": False, "momentum_decay": None}),
]


@pytest.mark.parametrize(
    ("c_gen", "c_mem", "depth", "T", "activation", "options"),
    CASES,
    ids=[f"Cgen={a}-Cmem={b}-depth={d}-T={t}-{act}" + "".join(f"-{k}" for k in o) for a, b, d, t, act, o in CASES],
)
def test_chunked_equals_the_token_rule_with_state_and_every_gradient(c_gen, c_mem, depth, T, activation, options):
    """The chunked closed form reproduces the token-by-token rule (autograd inner gradients, DGD as a matrix) in fp64:
    outputs, final weights and momentum of every memory, and the gradients into x, q, gate_w, gate_b, the momentum
    decay, the initial weights (and momentum, static keys and values where given), to 1e-10 relative RMS."""
    options = dict(options)
    make = {n: options.pop(n) for n in ("static_k", "static_v", "init_momentum") if n in options}
    inputs = make_inputs(T, depth, **make)
    if "momentum_decay" in options:
        inputs["momentum_decay"] = options.pop("momentum_decay")
    kw = {"chunk_size": c_gen, "memory_chunk_size": c_mem, "activation": activation, **options}
    ref = outputs_and_grads(recurrent_self_modifying_titans, inputs, **kw)
    out = outputs_and_grads(chunk_self_modifying_titans, inputs, **kw)
    assert ref.keys() == out.keys()
    unwritten = run(chunk_self_modifying_titans, inputs, **{**kw, "eta_max": 1e-300})[0]
    assert err_ratio(unwritten, ref["o"]) > 3e-3  # the writes change what is read: the case exercises the update
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=1e-10)


@pytest.mark.parametrize("momentum", [False, True], ids=["no-momentum", "momentum"])
@pytest.mark.parametrize("static", [False, True], ids=["generated-kv", "static-kv"])
def test_chunk_one_is_the_papers_per_token_rule(momentum, static):
    """At chunk 1 (both chunk sizes), a depth-1 memory follows Eq. 88 written out by hand: W_t = (alpha I - eta k^T k)
    W_{t-1} - eta grad, with every memory trained on its own generated values; with momentum, the Titans momentum on
    the whole DGD update. Outputs read the main memory before each write."""
    inputs = make_inputs(11, 1, static_k=static, static_v=static)
    if not momentum:
        inputs["momentum_decay"] = None
    o_ref, w_ref, _, _ = paper_rule(inputs, momentum=momentum)
    o, state = run(self_modifying_titans, inputs, chunk_size=1, memory_chunk_size=1)
    assert_close("o", o_ref, o, ratio=1e-12)
    assert_close("W", w_ref, state.weights[0], ratio=1e-12)


@pytest.mark.parametrize(("C_gen", "C_mem"), [(1, 1), (4, 8)])
def test_without_dgd_the_update_is_plain_gradient_descent(C_gen, C_mem):
    """dgd=False drops the (alpha I - eta k^T k) preconditioning: at chunk 1 it is the hand-written rule without the
    k^T k term, and it differs from the DGD model (at larger chunks too)."""
    inputs = make_inputs(13, 1)
    kw = {"chunk_size": C_gen, "memory_chunk_size": C_mem}
    o_plain, _ = run(self_modifying_titans, inputs, dgd=False, **kw)
    o_dgd, _ = run(self_modifying_titans, inputs, **kw)
    assert err_ratio(o_dgd, o_plain) > 1e-3
    if C_gen == C_mem == 1:
        inputs["momentum_decay"] = None
        o_ref, w_ref, _, _ = paper_rule(inputs, dgd=False)
        o, state = run(self_modifying_titans, inputs, dgd=False, **kw)
        assert_close("o", o_ref, o, ratio=1e-12)
        assert_close("W", w_ref, state.weights[0], ratio=1e-12)


def test_no_momentum_is_zero_momentum_decay():
    """momentum_decay=None equals a decay of 0 for every head (S_t = -eta_t U_t, a carried momentum is dropped), and
    differs from a non-zero decay."""
    inputs = make_inputs(21, 2, init_momentum=True)
    kw = {"chunk_size": 4, "memory_chunk_size": 8}
    o_none, s_none = run(self_modifying_titans, inputs, momentum_decay=None, **kw)
    o_zero, s_zero = run(self_modifying_titans, inputs, momentum_decay=torch.zeros(H, dtype=torch.float64), **kw)
    o_mom, _ = run(self_modifying_titans, inputs, **kw)
    assert_close("o", o_zero, o_none, ratio=1e-14)
    for i in range(2):
        assert_close(f"W[{i}]", s_zero.weights[i], s_none.weights[i], ratio=1e-14)
        assert_close(f"S[{i}]", s_zero.momentum[i], s_none.momentum[i], ratio=1e-14)
    assert err_ratio(o_mom, o_none) > 1e-3


def test_without_retention_alpha_is_one():
    """retention=False keeps the memories (alpha_t = 1): at chunk 1 it is the hand-written rule with alpha = 1 (with
    momentum), and it differs from the learned retention."""
    inputs = make_inputs(13, 1)
    o_ref, w_ref, _, _ = paper_rule(inputs, retention=False, momentum=True)
    o, state = run(self_modifying_titans, inputs, chunk_size=1, memory_chunk_size=1, retention=False)
    assert_close("o", o_ref, o, ratio=1e-12)
    assert_close("W", w_ref, state.weights[0], ratio=1e-12)
    o_kept, _ = run(self_modifying_titans, inputs, chunk_size=1, memory_chunk_size=1)
    assert err_ratio(o_kept, o) > 1e-3


@pytest.mark.parametrize(("static_k", "static_v"), [(True, False), (False, True), (True, True)])
def test_static_keys_and_values_replace_the_generated_ones_and_drop_their_memories(static_k, static_v):
    """Static keys (values) take the place of the generated ones and remove the k (v) generator from the stack: fed
    the very keys and values the full model generated, the reduced stack reproduces its outputs and the final weights
    of every memory it keeps."""
    full = make_inputs(13, 1)
    _, w_full, keys, values = paper_rule(full, momentum=True)
    o_full, s_full = run(self_modifying_titans, full, chunk_size=1, memory_chunk_size=1)
    names_full = memory_names(False, False)
    names = memory_names(static_k, static_v)
    assert names_full == ("memory", "k", "v", "eta", "alpha")
    assert names == tuple(n for n in names_full if not (n == "k" and static_k or n == "v" and static_v))
    keep = [names_full.index(n) for n in names]
    reduced = dict(full, static_k=keys if static_k else None, static_v=values if static_v else None)
    reduced["init_weights"] = [w[keep] for w in full["init_weights"]]
    o, state = run(self_modifying_titans, reduced, chunk_size=1, memory_chunk_size=1)
    assert state.weights[0].shape[1] == len(names)
    assert_close("o", o_full, o, ratio=1e-12)
    assert_close("kept weights", s_full.weights[0][:, keep], state.weights[0], ratio=1e-12)
    assert_close("kept weights (hand rule)", w_full[:, keep], state.weights[0], ratio=1e-12)


@pytest.mark.parametrize(("C_gen", "C_mem"), [(1, 1), (4, 8), (8, 4)])
def test_outputs_are_causal_and_read_before_the_write(C_gen, C_mem):
    """Changing x (or a static value) at token t changes only what is written at t, which o_t does not read: o_s for
    s <= t is unchanged and later outputs move. Changing q_t changes o_t alone."""
    T, t = 13, 6
    kw = {"chunk_size": C_gen, "memory_chunk_size": C_mem}
    for static in (False, True):
        inputs = make_inputs(T, 2, static_v=static)
        o, _ = run(self_modifying_titans, inputs, **kw)
        for name in ("x", "static_v") if static else ("x",):
            changed = {**inputs, name: inputs[name].detach().clone()}
            changed[name][:, t] += 1.0
            o2, _ = run(self_modifying_titans, changed, **kw)
            torch.testing.assert_close(o2[:, : t + 1], o[:, : t + 1], rtol=1e-13, atol=1e-14, msg=name)
            assert err_ratio(o[:, t + 1 :], o2[:, t + 1 :]) > 1e-4
        changed = {**inputs, "q": inputs["q"].detach().clone()}
        changed["q"][:, t] += 1.0
        o2, _ = run(self_modifying_titans, changed, **kw)
        torch.testing.assert_close(o2[:, :t], o[:, :t], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(o2[:, t + 1 :], o[:, t + 1 :], rtol=1e-13, atol=1e-14)
        assert err_ratio(o[:, t], o2[:, t]) > 1e-3


@pytest.mark.parametrize(("C_gen", "C_mem", "split"), [(1, 1, 5), (4, 8, 16), (8, 4, 8)])
def test_splitting_at_a_common_chunk_boundary_and_carrying_the_state_changes_nothing(C_gen, C_mem, split):
    """Running [0, s) then [s, T) from the returned state equals one call when s is a multiple of both chunk sizes."""
    T = 29
    inputs = make_inputs(T, 2, init_momentum=True)
    kw = {"chunk_size": C_gen, "memory_chunk_size": C_mem}
    o_full, s_full = run(self_modifying_titans, inputs, **kw)
    o1, s1 = run(self_modifying_titans, _slice(inputs, slice(0, split)), **kw)
    o2, s2 = run(self_modifying_titans, _slice(inputs, slice(split, T)), state=s1, **kw)
    assert_close("o", o_full, torch.cat([o1, o2], dim=1), ratio=1e-13)
    for i in range(2):
        assert_close(f"W[{i}]", s_full.weights[i], s2.weights[i], ratio=1e-13)
        assert_close(f"S[{i}]", s_full.momentum[i], s2.momentum[i], ratio=1e-13)


def test_fp32_chunked_tracks_the_fp64_ground_truth():
    """In fp32 the chunked form (generator chunk 8, memory chunk 16, depth 2) stays within 3e-5 relative RMS of the
    fp64 token rule on o, the final state and every gradient (about 2e-6 measured); o comes back in fp32."""
    kw = {"chunk_size": 8, "memory_chunk_size": 16}
    ref = outputs_and_grads(recurrent_self_modifying_titans, make_inputs(33, 2, init_momentum=True), **kw)
    inputs32 = make_inputs(33, 2, init_momentum=True, dtype=torch.float32)
    out = outputs_and_grads(chunk_self_modifying_titans, inputs32, **kw)
    assert out["o"].dtype == torch.float32 and out["W[0]"].dtype == torch.float32
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=3e-5)


def test_the_token_rule_runs_under_no_grad_and_refuses_inference_mode_by_name():
    """The token rule runs under no_grad (same outputs, no graph); under inference_mode, where autograd cannot take its
    inner gradients, it says so. The op itself runs under inference_mode."""
    inputs = make_inputs(6, 2)
    o_ref, _ = run(recurrent_self_modifying_titans, inputs, chunk_size=2, memory_chunk_size=4)
    with torch.no_grad():
        o, state = run(recurrent_self_modifying_titans, inputs, chunk_size=2, memory_chunk_size=4)
    assert not o.requires_grad and not state.weights[0].requires_grad
    assert_close("o (no_grad)", o_ref, o, ratio=1e-13)
    with torch.inference_mode():
        o_op, _ = run(self_modifying_titans, inputs, chunk_size=2, memory_chunk_size=4)
        with pytest.raises(RuntimeError, match="outside inference_mode"):
            run(recurrent_self_modifying_titans, inputs, chunk_size=2, memory_chunk_size=4)
    assert_close("o (inference_mode)", o_ref, o_op, ratio=1e-12)


def _bad(**changes):
    inputs = make_inputs(8, 2, dtype=torch.float32)
    args = {n: inputs[n].detach() for n in ("x", "q", "gate_w", "gate_b", "momentum_decay")}
    args["state"] = initial_self_mod_state(tuple(w.detach() for w in inputs["init_weights"]), B)
    args.update(changes)
    return args


def _state(M, *layers):
    weights = tuple(torch.zeros(B, M, H, a, b) for a, b in layers)
    return SelfModState(weights, tuple(torch.zeros_like(w) for w in weights))


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"x": torch.randn(B, 8, H)}, ValueError, r"x must be \[B, T, H, K\]"),
        ({"q": torch.randn(B, 7, H, K)}, ValueError, "q must have x's shape"),
        ({"q": torch.randn(B, 8, H, K, dtype=torch.float64)}, TypeError, "q must have x's dtype"),
        ({"x": torch.randint(0, 3, (B, 8, H, K))}, TypeError, "x must be a floating-point tensor"),
        ({"static_k": torch.randn(B, 8, H, K + 1)}, ValueError, "static_k must have x's shape"),
        ({"gate_w": torch.randn(H, K)}, ValueError, r"gate_w must be \[2, H, K\]"),
        ({"gate_b": torch.randn(2, H, 1)}, ValueError, r"gate_b must be \[2, H\]"),
        ({"momentum_decay": torch.rand(H + 1)}, ValueError, r"momentum_decay must be \[H\]"),
        ({"state": (torch.zeros(B, 5, H, K, K),)}, TypeError, "SelfModState.*initial_self_mod_state"),
        ({"state": _state(4, (K, HIDDEN), (HIDDEN, K))}, ValueError, "holds 4 memories but these inputs need 5"),
        ({"static_k": torch.randn(B, 8, H, K)}, ValueError, "holds 5 memories but these inputs need 4: memory, v"),
        ({"state": _state(5, (K + 1, HIDDEN), (HIDDEN, K))}, ValueError, r"layer 0 must be \[B, M, H, d_in, d_out\]"),
        ({"state": _state(5, (K, HIDDEN), (HIDDEN, K + 1))}, ValueError, "last layer outputs 5 values"),
        ({"chunk_size": 4, "memory_chunk_size": 6}, ValueError, "must divide the larger"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"memory_chunk_size": 2.5}, ValueError, "memory_chunk_size must be a positive int"),
        ({"activation": "relu"}, ValueError, r"activation must be one of \('gelu', 'silu'\)"),
        ({"eta_max": 0.0}, ValueError, "eta_max must be a number > 0"),
        ({"max_grad_norm": -1.0}, ValueError, "max_grad_norm must be > 0 or None"),
        # without triton the backend does not exist; with it, chunks above 64 are beyond the kernels
        ({"backend": "triton", "memory_chunk_size": 128}, ValueError, "chunk_size=128|available: reference"),
    ],
    ids=[
        "x-rank",
        "q-length",
        "q-dtype",
        "x-int",
        "static_k-shape",
        "gate_w-shape",
        "gate_b-shape",
        "momentum_decay-shape",
        "not-a-state",
        "too-few-memories",
        "static-k-drops-a-memory",
        "layer0-d_in!=K",
        "not-residual",
        "chunks-do-not-divide",
        "chunk_size=0",
        "memory_chunk_size=2.5",
        "activation",
        "eta_max",
        "max_grad_norm",
        "backend",
    ],
)
def test_bad_inputs_get_an_error_that_names_the_problem(changes, error, match):
    """Wrong shapes or dtypes, a stack with the wrong number of memories, chunk sizes that are not positive or do not
    divide, and unknown settings fail before any work with a message naming what is expected."""
    with pytest.raises(error, match=match):
        self_modifying_titans(**_bad(**changes))
