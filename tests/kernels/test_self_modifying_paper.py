"""HOPE's self-modifying memories against the paper: the op at every chunk size equals Eq. 91 written as a literal
per-token, per-layer loop in fp64 (nothing of the op's code is used), and the DGD term contracts the memory along a
repeated key by exactly prod_t (alpha_t - eta_t), as the paper's rule does.

The loop below is the rule of arXiv §8.2 (Eq. 90-91) with the readings docs/PAPER_COMPLIANCE.md records: in the row
convention ``z = a W`` (W of shape [d_in, d_out]), every memory M(z) = z + MLP(z) and each of its layers follows

    W_t = (alpha_t I - eta_t a_hat^T a_hat) W_{t-1} - eta_t G_t                     (momentum off)
    S_t = beta S_{t-1} - eta_t (G_t + a_hat^T a_hat W_{t-1}),  W_t = alpha_t W_{t-1} + S_t   (momentum on)

with the layer input a and the gradient G = dL/dW of ||M(k_t) - M(v_t)||^2 taken at the memory's chunk-start
snapshot, a_hat = a / max(|a|, 1e-6), and the DGD product on the running weights W_{t-1}. k, v, eta and alpha come
from the generator memories' snapshot; the output reads the main memory before the token's write (Eq. 94).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels._testing import assert_close, err_ratio, state_outputs_and_grads
from kernels.self_modifying import SelfModState, initial_self_mod_state, self_modifying_titans

B, H, K = 2, 2, 8
EPS = 1e-6
ETA_MAX = 0.3  # a rate the chunk-start linearisation could not take at chunk 64; the exact rule is stable at it


def act(z, name):
    return F.gelu(z) if name == "gelu" else F.silu(z)


def mlp_read(z, weights, activation):
    """M(z) = z + MLP(z) for one memory: z [B, H, d], weights [B, H, d_in, d_out] per layer."""
    h = z
    for i, w in enumerate(weights):
        h = torch.einsum("bhi,bhij->bhj", h, w)
        if i < len(weights) - 1:
            h = act(h, activation)
    return z + h


def eq91_loop(inputs, *, c_gen, c_mem, activation="gelu", dgd_on="running", max_grad_norm=None):
    """The paper's rule token by token, memory by memory, layer by layer (fp64). ``dgd_on="snapshot"`` multiplies the
    DGD projection into the chunk-start weights instead (the linearisation the op must *not* compute; used only to
    show that this test can tell the two apart)."""
    x, q, gw, gb = inputs["x"], inputs["q"], inputs["gate_w"], inputs["gate_b"]
    static_k, static_v, beta = inputs["static_k"], inputs["static_v"], inputs["momentum_decay"]
    names = ["memory"] + [n for n, s in (("k", static_k), ("v", static_v)) if s is None] + ["eta", "alpha"]
    T = x.shape[1]
    W = {n: [w[:, m] for w in inputs["state"].weights] for m, n in enumerate(names)}
    S = {n: [s[:, m] for s in inputs["state"].momentum] for m, n in enumerate(names)}
    snap = {}
    outs = []
    for t in range(T):
        for n in names:
            if t % (c_mem if n == "memory" else c_gen) == 0:
                snap[n] = list(W[n])  # the chunk-start state: Eq. 90's M_{C ceil(t / C)}, read as the chunk start
        xt = x[:, t]
        k = static_k[:, t] if static_k is not None else F.normalize(mlp_read(xt, snap["k"], activation), dim=-1)
        v = static_v[:, t] if static_v is not None else mlp_read(xt, snap["v"], activation)
        eta = ETA_MAX * torch.sigmoid((mlp_read(xt, snap["eta"], activation) * gw[0]).sum(-1) + gb[0])
        alpha = torch.sigmoid((mlp_read(xt, snap["alpha"], activation) * gw[1]).sum(-1) + gb[1])
        eta, alpha = eta[..., None, None], alpha[..., None, None]
        outs.append(mlp_read(q[:, t], W["memory"], activation))  # o_t = M_{t-1}(q_t), Eq. 94
        for n in names:
            target = mlp_read(v, snap[n], activation)  # the memory's own value for the token (Eq. 84-85)
            outer = torch.is_grad_enabled()
            with torch.enable_grad():  # the prediction's own copy of the snapshot: the target stays a constant
                probe = [w.clone() if w.requires_grad else w.detach().requires_grad_() for w in snap[n]]
                loss = (mlp_read(k, probe, activation) - target).pow(2).sum()
                grads = torch.autograd.grad(loss, probe, create_graph=outer)
            if max_grad_norm is not None:
                norm = torch.sqrt(sum(g.pow(2).sum((-1, -2)) for g in grads))[..., None, None]
                grads = [g * torch.clamp(max_grad_norm / norm, max=1.0) for g in grads]
            a = k  # layer inputs at the snapshot
            new_w, new_s = [], []
            for i, (w, s, g) in enumerate(zip(W[n], S[n], grads)):
                a_hat = a / a.norm(dim=-1, keepdim=True).clamp_min(EPS)
                proj = torch.einsum("bhi,bhj->bhij", a_hat, a_hat)  # a_hat^T a_hat
                on = w if dgd_on == "running" else snap[n][i]
                update = g + proj @ on
                if beta is None:  # Eq. 91 as printed: W_t = (alpha I - eta a^T a) W_{t-1} - eta G
                    new_w.append(alpha * w - eta * update)
                    new_s.append(s)  # unused
                else:  # the Titans momentum on the whole update
                    s = beta[:, None, None] * s - eta * update
                    new_w.append(alpha * w + s)
                    new_s.append(s)
                a = act(torch.einsum("bhi,bhij->bhj", a, snap[n][i]), activation)
            W[n], S[n] = new_w, new_s
    weights = tuple(torch.stack([W[n][i] for n in names], 1) for i in range(len(W["memory"])))
    momentum = tuple(torch.stack([S[n][i] for n in names], 1) for i in range(len(S["memory"])))
    return torch.stack(outs, 1), SelfModState(weights, momentum)


def make_inputs(T, depth, expansion, keys, *, momentum=True, seed=0):
    """fp64 leaves: generator inputs and queries (unit rows), gate projections (retention around 0.9), a momentum
    decay per head, initial weights and momentum of every memory, and the keys: ``generated`` (the k memory makes
    them), ``random`` (static, random directions and norms), ``nonunit`` (static, norms from 0.3 to 3), ``repeated``
    (static, one key for every token, with random values)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    static = keys != "generated"
    M = 4 if static else 5  # memory, (k), v, eta, alpha
    hidden = expansion * K
    dims = [K, hidden, K] if depth == 2 else [K, K]
    layers = list(zip(dims[:-1], dims[1:]))
    inputs = {
        "x": F.normalize(randn(B, T, H, K), dim=-1),
        "q": F.normalize(randn(B, T, H, K), dim=-1),
        "gate_w": 0.5 * randn(2, H, K),
        "gate_b": 0.3 * randn(2, H) + torch.tensor([[0.0], [2.0]], dtype=torch.float64),
        "momentum_decay": 0.9 * torch.rand(H, generator=gen, dtype=torch.float64) if momentum else None,
        "init_weights": [0.5 * randn(M, H, a, b) / a**0.5 for a, b in layers],
        "init_momentum": [0.05 * randn(B, M, H, a, b) for a, b in layers] if momentum else None,
        "static_k": None,
        "static_v": None,
    }
    if keys == "random":
        inputs["static_k"] = randn(B, T, H, K) / K**0.5
    elif keys == "nonunit":
        inputs["static_k"] = F.normalize(randn(B, T, H, K), dim=-1) * torch.linspace(0.3, 3.0, T)[:, None, None]
    elif keys == "repeated":
        inputs["static_k"] = F.normalize(randn(B, 1, H, K), dim=-1).expand(B, T, H, K).clone()
    inputs = {n: _leaf(t) for n, t in inputs.items()}
    return inputs


def _leaf(t):
    if t is None:
        return None
    if isinstance(t, list):
        return [_leaf(x) for x in t]
    return t.requires_grad_()


def with_state(inputs):
    """The inputs with the state the op and the loop start from (learned initial weights, carried momentum)."""
    state = initial_self_mod_state(tuple(inputs["init_weights"]), B)
    if inputs["init_momentum"] is not None:
        state = SelfModState(state.weights, tuple(inputs["init_momentum"]))
    return {**inputs, "state": state}


def run_op(inputs, *, c_gen, c_mem, activation="gelu", max_grad_norm=None):
    return self_modifying_titans(
        inputs["x"],
        inputs["q"],
        inputs["gate_w"],
        inputs["gate_b"],
        inputs["state"],
        static_k=inputs["static_k"],
        static_v=inputs["static_v"],
        momentum_decay=inputs["momentum_decay"],
        chunk_size=c_gen,
        memory_chunk_size=c_mem,
        eta_max=ETA_MAX,
        activation=activation,
        max_grad_norm=max_grad_norm,
        backend="reference",
    )


def outputs(o, state):
    return {
        "o": o,
        **{f"W[{i}]": w for i, w in enumerate(state.weights)},
        **{f"S[{i}]": m for i, m in enumerate(state.momentum)},
    }


# (C_gen, C_mem, depth, memory_expansion, keys, activation, options). Every chunk size of the list at both depths and
# both expansions, each key kind, both activations, clipping, momentum off, and the model's pairing (64, 16).
CASES = [
    (1, 1, 1, 1, "generated", "gelu", {}),
    (1, 1, 2, 2, "nonunit", "silu", {}),
    (4, 4, 2, 1, "generated", "gelu", {}),
    (4, 4, 1, 1, "repeated", "gelu", {"momentum": False}),
    (16, 16, 2, 2, "generated", "gelu", {}),
    (16, 16, 2, 1, "random", "silu", {"max_grad_norm": 0.5}),
    (16, 16, 1, 1, "repeated", "gelu", {}),
    (64, 64, 2, 1, "generated", "silu", {}),
    (64, 64, 2, 2, "nonunit", "gelu", {"momentum": False}),
    (64, 64, 1, 1, "random", "gelu", {}),
    (64, 16, 2, 1, "generated", "gelu", {}),
]
GRADS_AT = (16, 64)  # gradients are compared where the chunks are long (they are the costly part of the loop)
T_OF = {1: 9, 4: 23, 16: 40, 64: 80}  # at least one full chunk and a partial one at every size


@pytest.mark.parametrize(
    ("c_gen", "c_mem", "depth", "expansion", "keys", "activation", "options"),
    CASES,
    ids=[f"C{a}-{b}-depth{d}-x{e}-{k}-{act}" + "".join(f"-{o}" for o in opts) for a, b, d, e, k, act, opts in CASES],
)
@pytest.mark.slow
def test_the_chunked_op_equals_the_literal_eq91_loop(c_gen, c_mem, depth, expansion, keys, activation, options):
    """At every chunk size the op computes the paper's rule, not an approximation of it: outputs and the final
    weights and momentum of all memories equal the literal loop in fp64 (and, at chunks 16 and 64, the gradients into
    x, q, the gates, the momentum decay, the initial weights and momentum and the static keys)."""
    options = dict(options)
    clip = options.pop("max_grad_norm", None)
    inputs = make_inputs(T_OF[max(c_gen, c_mem)], depth, expansion, keys, **options)
    state = with_state(inputs)
    kw = {"c_gen": c_gen, "c_mem": c_mem, "activation": activation, "max_grad_norm": clip}
    grads = max(c_gen, c_mem) in GRADS_AT
    with torch.set_grad_enabled(grads):
        o_ref, s_ref = eq91_loop(state, **kw)
        o, s = run_op(state, **kw)
    if inputs["momentum_decay"] is None:  # Eq. 91 itself: there is no momentum buffer to compare
        s_ref, s = SelfModState(s_ref.weights, ()), SelfModState(s.weights, ())
    if grads:
        ref = state_outputs_and_grads("o", o_ref, s_ref, inputs, allow_unused=True)
        out = state_outputs_and_grads("o", o, s, inputs, allow_unused=True)
    else:
        ref, out = outputs(o_ref, s_ref), outputs(o, s)
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], ratio=1e-10)
    if max(c_gen, c_mem) > 1:  # the test can fail: the chunk-start linearisation of DGD is far from the paper's rule
        with torch.no_grad():
            lin = eq91_loop(state, **kw, dgd_on="snapshot")[1]
        assert err_ratio(s_ref.weights[-1], lin.weights[-1]) > 1e-4


@pytest.mark.parametrize(("depth", "chunk", "T"), [(1, 64, 64), (1, 16, 200), (2, 64, 64)])
def test_a_repeated_key_without_gradient_contracts_the_memory_by_the_product_of_alpha_minus_eta(depth, chunk, T):
    """static_k = static_v = one unit key u: every memory's target is its own prediction, so the gradient is exactly
    zero and only DGD and retention act. Without momentum each layer that reads u keeps prod_t (alpha_t - eta_t) of
    its component along u and prod_t alpha_t of the rest, at any chunk size (with eta = 0.1, alpha = 1 and 64 tokens:
    0.9^64 = 0.0012 along u, where the chunk-start linearisation gives 1 - 64 x 0.1 = -5.4). Checked on every memory
    of the stack (main, eta and alpha generators) through the public op."""
    gen = torch.Generator().manual_seed(3)
    u = F.normalize(torch.randn(B, 1, H, K, generator=gen, dtype=torch.float64), dim=-1)
    keys = u.expand(B, T, H, K)
    dims = [K, 2 * K, K] if depth == 2 else [K, K]
    init = tuple(torch.randn(3, H, a, b, generator=gen, dtype=torch.float64) / a**0.5 for a, b in zip(dims, dims[1:]))
    # per head: eta = 0.2 sigmoid(b_eta) = 0.1 and 0.05; alpha = sigmoid(b_alpha) = 1 (exactly, in fp64) and 0.99
    gate_b = torch.tensor([[0.0, -1.0986122886681098], [50.0, 4.59511985013459]], dtype=torch.float64)
    eta, alpha = 0.2 * torch.sigmoid(gate_b[0]), torch.sigmoid(gate_b[1])
    x = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    state = initial_self_mod_state(init, B)
    _, final = self_modifying_titans(
        x,
        x,
        torch.zeros(2, H, K, dtype=torch.float64),
        gate_b,
        state,
        static_k=keys,
        static_v=keys,
        chunk_size=chunk,
        memory_chunk_size=chunk,
        eta_max=0.2,
        backend="reference",
    )
    along = ((alpha - eta) ** T)[:, None]  # [H, 1]
    rest = (alpha**T)[:, None]
    w0, w = state.weights[0], final.weights[0]  # layer 1 reads u itself: [B, M, H, K, d_out]
    u_row = u[:, 0, None, :, None, :]  # [B, 1, H, 1, K]
    got = (u_row @ w).squeeze(-2)
    want = along * (u_row @ w0).squeeze(-2)
    # 0.9^200 = 7e-10 of an O(1) start: round-off of the O(1) terms is ~1e-16 absolute, so relative 1e-8 there
    assert_close("component along u", want, got, ratio=1e-12 if T <= 64 else 1e-8)
    assert along[0].item() == pytest.approx(0.9**T, rel=1e-12)
    perp = torch.randn(B, 1, H, 1, K, generator=gen, dtype=torch.float64)
    perp = perp - (perp * u_row).sum(-1, keepdim=True) * u_row  # orthogonal to u
    assert_close("the rest", rest * (perp @ w0).squeeze(-2), (perp @ w).squeeze(-2), ratio=1e-12)
    if depth == 2:  # layer 2 reads a2 = phi(u W1) at the chunk start: one chunk here, so a2 is one fixed key
        a2 = F.normalize(F.gelu(u_row @ w0), dim=-1)
        got2 = (a2 @ final.weights[1]).squeeze(-2)
        assert_close("layer 2 along its input", along * (a2 @ state.weights[1]).squeeze(-2), got2, ratio=1e-12)
