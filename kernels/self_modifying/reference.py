"""Pure-PyTorch self-modifying Titans memory (HOPE, Nested Learning §8, Eq. 83-93): the token-by-token rule with
autograd gradients (ground truth) and the chunked closed form the models run. The math is in this folder's README.

Shapes: x, q (and static keys / values) [B, T, H, K]; gate_w [2, H, K], gate_b [2, H]; momentum_decay [H]. The state
stacks M residual MLP memories, ``M_m(z) = z + MLP_m(z)`` (memory 0 the main memory, then the generators of k, v,
eta and alpha that are present): per layer, weights and momentum [B, M, H, d_in, d_out] with d_0 = d_L = K. Both forms
compute in the promotion of x's dtype and float32 and return the output in x's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.memory_math import clip_factor, grad_factors, phi, segment_products
from kernels.titans_memory.reference import memory_read

__all__ = [
    "SelfModState",
    "chunk_self_modifying_titans",
    "initial_self_mod_state",
    "memory_names",
    "recurrent_self_modifying_titans",
]

NORM_EPS = 1e-6  # F.normalize's eps for generated keys and for the DGD layer inputs


class SelfModState(NamedTuple):
    """The fast state of all memories: per layer, the weights W_l and momentum S_l, each [B, M, H, d_in, d_out]
    (M memories in the order of ``memory_names``)."""

    weights: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]


def memory_names(static_k: bool, static_v: bool) -> tuple[str, ...]:
    """The memories in the stack, in order: the main memory, then the generators (k and v only when not static)."""
    return ("memory", *(() if static_k else ("k",)), *(() if static_v else ("v",)), "eta", "alpha")


def initial_self_mod_state(init_weights: tuple[torch.Tensor, ...], batch_size: int) -> SelfModState:
    """The state before the first token: the learned initial weights [M, H, d_in, d_out] per layer, expanded over the
    batch (a view, so gradients reach the parameters), with zero momentum."""
    weights = tuple(w.unsqueeze(0).expand(batch_size, *w.shape) for w in init_weights)
    return SelfModState(weights, tuple(torch.zeros_like(w) for w in weights))


def check_chunk_sizes(chunk_size: int, memory_chunk_size: int) -> None:
    """Both chunk sizes are positive ints and the smaller divides the larger (so sub-chunks never straddle a chunk)."""
    for label, c in (("chunk_size", chunk_size), ("memory_chunk_size", memory_chunk_size)):
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ValueError(f"self_modifying_titans: {label} must be a positive int, got {c!r}")
    small, large = sorted((chunk_size, memory_chunk_size))
    if large % small:
        raise ValueError(
            f"self_modifying_titans: the smaller of chunk_size ({chunk_size}) and memory_chunk_size "
            f"({memory_chunk_size}) must divide the larger"
        )


def _residual_read(z: torch.Tensor, weights, activation: str) -> torch.Tensor:
    """M(z) = z + MLP(z) for z [..., N, K] and weights [..., d_in, d_out] (leading dimensions broadcast)."""
    return z + memory_read(z, weights, activation)


def _gates(eta_out, alpha_out, gate_w, gate_b, eta_max, retention):
    """The per-head scalars from the eta / alpha generators' outputs [B, H, N, K]: eta [B, H, N] in (0, eta_max) and
    the retention alpha in (0, 1) (exactly 1 without retention)."""
    eta = eta_max * torch.sigmoid((eta_out * gate_w[0, :, None, :]).sum(-1) + gate_b[0, :, None])
    if not retention:
        return eta, torch.ones_like(eta)
    return eta, torch.sigmoid((alpha_out * gate_w[1, :, None, :]).sum(-1) + gate_b[1, :, None])


def _cast(acc, *tensors):
    return [None if t is None else t.to(acc) for t in tensors]


def _update_factors(k, v, anchor, momentum, before, activation, max_grad_norm, dgd):
    """Per-token update factors of a group of G memories with chunk-start weights ``anchor`` and momentum
    ``momentum`` ([B, G, H, d_in, d_out] per layer), for keys and values [B, H, n, K]: token s of the chunk adds
    ``U_s = lefts_s^T rights_s`` per layer (README, "The chunked form").

    Each memory's target is its own read of v (Eq. 84-85); the gradient of ||M(k) - target||^2 at the anchor is the
    outer product a_s^T delta_s per layer (target held constant; residual memory: the MLP's target is target - k).
    Without DGD that is the update. With DGD (Eq. 88-91) the update is U_s = G_s + a_hat_s^T (a_hat_s W_{s-1}): the
    layer input a_hat (normalised, at the anchor) multiplies the *running* weights. Every term shares the left factor
    a_hat_s (a_s = max(|a_s|, eps) a_hat_s), so U_s = a_hat_s^T r_s with r_s = |a_s| delta_s + a_hat_s W_{s-1}, and
    since W_{s-1} is the chunk's closed form in the earlier r (``before``: the coefficients of the state before each
    token), the r of a chunk solve one unit lower-triangular system (a UT transform, as for the delta rule):
    (I + Gamma_before * (A_hat A_hat^T)) R = |A| * Delta + keep_before * (A_hat W_0) + d_before * (A_hat S_0)."""
    vhat = _residual_read(v[:, None], anchor, activation)
    keys = k[:, None].expand_as(vhat)
    lefts, deltas = grad_factors(keys, vhat - keys, anchor, activation, max_grad_norm)
    if not dgd:
        return lefts, deltas
    keep, d, gamma = (t[:, None] for t in before)  # broadcast over the group's memories
    units, rights = [], []
    for i, (a, delta, w, s) in enumerate(zip(lefts, deltas, anchor, momentum)):
        if i == 0:  # the first layer's input is the key itself, one for the whole group: its system is shared
            a = k[:, None]
        norm = a.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)  # F.normalize's denominator
        unit = a / norm
        rhs = norm * delta + keep * (unit @ w) + d * (unit @ s)
        system = gamma * (unit @ unit.mT)  # strictly lower: the diagonal of Gamma_before is 0
        # R = (I + system)^-1 rhs, solved as R^T (I + system^T) = rhs^T: LAPACK returns column-major solutions, so this
        # way round R comes back row-major, and the ops after it (and the backward) run on contiguous tensors
        rights.append(torch.linalg.solve_triangular(system.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT)
        units.append(unit)
    return units, rights


class _Coefficients(NamedTuple):
    """The unrolled recurrence S_i = beta S_{i-1} - eta_i U_i, W_i = alpha_i W_{i-1} + S_i over n tokens:
    W_i = keep_i W_0 + d_i S_0 - sum_{s<=i} gamma_is U_s and S_i = mom_i S_0 - sum_s eta_s (E_i / E_s) U_s."""

    keep: torch.Tensor  # prod_{j<=i} alpha_j, [B, H, n]
    d: torch.Tensor  # weight of S_0 in W_i, [B, H, n, 1]
    gamma: torch.Tensor  # weight of -U_s in W_i, [B, H, n, n]
    mom: torch.Tensor  # E_i = beta^i, [B, H, n]
    s_last: torch.Tensor  # weight of -U_s in S_n: eta_s E_n / E_s, [B, H, n]


def _coefficients(eta: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> _Coefficients:
    """The coefficients of a chunk, gates [B, H, n] (or of several chunks at once, [B, H, NC, n]; beta [H])."""
    decay = beta.reshape(-1, *([1] * (eta.dim() - 2))).expand_as(eta)
    d_keep, d_mom = segment_products(alpha), segment_products(decay)  # P_i / P_r and E_r / E_s, [.., n, n]
    keep, mom = alpha.cumprod(-1), decay.cumprod(-1)
    d = d_keep @ mom[..., None]
    gamma = (d_keep @ d_mom) * eta[..., None, :]
    return _Coefficients(keep, d, gamma, mom, d_mom[..., -1, :] * eta)


def _chunk_coefficients(eta: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, chunk_size: int) -> list:
    """(coefficients, those of the state each token finds) of every chunk of gates [B, H, T]. They depend on the
    gates alone, not on the memory, so all full chunks are computed in one batch (a partial last one apart)."""
    B, H, T = eta.shape
    full = T // chunk_size
    out = []
    if full:
        n = full * chunk_size
        co = _coefficients(*(g[..., :n].reshape(B, H, full, chunk_size) for g in (eta, alpha)), beta)
        parts = [t.unbind(2) for t in (*co, *_before(co))]
        out = [(_Coefficients(*(p[j] for p in parts[:5])), tuple(p[j] for p in parts[5:])) for j in range(full)]
    if T % chunk_size:
        co = _coefficients(eta[..., full * chunk_size :], alpha[..., full * chunk_size :], beta)
        out.append((co, _before(co)))
    return out


def _before(co: _Coefficients):
    """The coefficients of the state each token finds (row i - 1; the chunk start for the first token): keep
    [B, H, n, 1], d [B, H, n, 1] and Gamma [B, H, n, n], strictly lower-triangular."""
    keep = F.pad(co.keep[..., :-1], (1, 0), value=1.0)[..., None]
    d = F.pad(co.d[..., :-1, :], (0, 0, 1, 0))
    gamma = F.pad(co.gamma[..., :-1, :], (0, 0, 1, 0))
    return keep, d, gamma


def _advance(weights, momentum, lefts, rights, co: _Coefficients):
    """The state after the n tokens, for every memory of the group at once (coefficients broadcast over it)."""
    coef_w = co.gamma[:, None, :, -1, :, None]  # [B, 1, H, n, 1]
    coef_s = co.s_last[:, None, :, :, None]
    keep, d, mom = (t[:, None, :, None, None] for t in (co.keep[..., -1], co.d[..., -1, 0], co.mom[..., -1]))
    new_w = [
        keep * w + d * s - a.transpose(-1, -2) @ (coef_w * r) for w, s, a, r in zip(weights, momentum, lefts, rights)
    ]
    new_s = [mom * s - a.transpose(-1, -2) @ (coef_s * r) for s, a, r in zip(momentum, lefts, rights)]
    return new_w, new_s


def _read_before_write(q, weights, momentum, lefts, rights, before, activation: str):
    """M(q_i) of a single memory ([B, 1, H, ., .] tensors) as it stood before token i's write (``before``: the
    coefficients of row i - 1), applied layer by layer to the query's own activations (exact)."""
    keep, d, gamma = before
    h = q
    for i in range(len(weights)):
        z = keep * (h @ weights[i][:, 0]) + d * (h @ momentum[i][:, 0])
        z = z - (gamma * (h @ lefts[i][:, 0].transpose(-1, -2))) @ rights[i][:, 0]
        h = phi(z, activation) if i < len(weights) - 1 else z
    return q + h


def chunk_self_modifying_titans(
    x: torch.Tensor,
    q: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    state: SelfModState,
    *,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    momentum_decay: torch.Tensor | None = None,
    chunk_size: int = 16,
    memory_chunk_size: int = 16,
    eta_max: float = 0.1,
    dgd: bool = True,
    retention: bool = True,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
    main_memory=None,
) -> tuple[torch.Tensor, SelfModState]:
    """The chunked closed form. Each group of memories advances once per chunk of its own: the generators every
    ``chunk_size`` tokens (they generate the chunk's k, v, eta and alpha from, and take its gradients at, their
    chunk-start state, all in parallel), the main memory every ``memory_chunk_size`` tokens (gradients at its
    chunk-start state, each token read exactly before its own write). Inside a chunk everything is batched matmuls
    over [B, G, H, n, .]; the recurrence of (W, S) is folded into [n, n] coefficient matrices. Only the states cross
    chunk boundaries, so the state is rewritten once per chunk, not once per token. ``main_memory`` replaces the main
    memory's chunk loop (``_main_memory``, same signature): the Triton backend passes its kernel. Returns (o, final
    state)."""
    check_chunk_sizes(chunk_size, memory_chunk_size)
    names = memory_names(static_k is not None, static_v is not None)
    acc, out_dtype = torch.promote_types(x.dtype, torch.float32), x.dtype
    x, q, static_k, static_v = (None if t is None else t.transpose(1, 2) for t in _cast(acc, x, q, static_k, static_v))
    gate_w, gate_b = _cast(acc, gate_w, gate_b)
    beta = x.new_zeros(x.shape[1]) if momentum_decay is None else momentum_decay.to(acc)
    main_w, gen_w = [w.to(acc)[:, :1] for w in state.weights], [w.to(acc)[:, 1:] for w in state.weights]
    main_s, gen_s = [s.to(acc)[:, :1] for s in state.momentum], [s.to(acc)[:, 1:] for s in state.momentum]
    # The main memory never feeds the generators, so all generator chunks can run first (README, "The chunked form").
    (k, v, eta, alpha), gen_w, gen_s = _generate(
        x,
        gate_w,
        gate_b,
        gen_w,
        gen_s,
        static_k,
        static_v,
        names,
        beta,
        chunk_size=chunk_size,
        eta_max=eta_max,
        dgd=dgd,
        retention=retention,
        activation=activation,
        max_grad_norm=max_grad_norm,
    )
    run_main = main_memory or _main_memory
    o, main_w, main_s = run_main(
        q,
        k,
        v,
        eta,
        alpha,
        beta,
        main_w,
        main_s,
        chunk_size=memory_chunk_size,
        dgd=dgd,
        activation=activation,
        max_grad_norm=max_grad_norm,
    )
    weights = tuple(torch.cat([m, g], dim=1) for m, g in zip(main_w, gen_w))
    momentum = tuple(torch.cat([m, g], dim=1) for m, g in zip(main_s, gen_s))
    return o.transpose(1, 2).to(out_dtype), SelfModState(weights, momentum)


def _generate(
    x,
    gate_w,
    gate_b,
    gen_w,
    gen_s,
    static_k,
    static_v,
    names,
    beta,
    *,
    chunk_size,
    eta_max,
    dgd,
    retention,
    activation,
    max_grad_norm,
):
    """The generators over the whole sequence, chunk by chunk: each chunk generates its tokens' k, v, eta and alpha
    from the generators' chunk-start state and advances the generators over them. Returns ((k, v, eta, alpha) with
    heads first, [B, H, T, .]) and the generators' final weights and momentum."""
    generated_chunks = []
    for start in range(0, x.shape[2], chunk_size):
        sl = slice(start, start + chunk_size)
        generated = dict(zip(names[1:], _residual_read(x[:, None, :, sl], gen_w, activation).unbind(1)))
        k = static_k[:, :, sl] if static_k is not None else F.normalize(generated["k"], dim=-1, eps=NORM_EPS)
        v = static_v[:, :, sl] if static_v is not None else generated["v"]
        eta, alpha = _gates(generated["eta"], generated["alpha"], gate_w, gate_b, eta_max, retention)
        co = _coefficients(eta, alpha, beta)
        lefts, rights = _update_factors(k, v, gen_w, gen_s, _before(co), activation, max_grad_norm, dgd)
        gen_w, gen_s = _advance(gen_w, gen_s, lefts, rights, co)
        generated_chunks.append((k, v, eta, alpha))
    return [torch.cat(t, dim=2) for t in zip(*generated_chunks)], gen_w, gen_s


def _main_memory(q, k, v, eta, alpha, beta, main_w, main_s, *, chunk_size, dgd, activation, max_grad_norm):
    """The main memory over the whole sequence (inputs [B, H, T, .], state [B, 1, H, d_in, d_out] per layer), chunk
    by chunk: factors at the chunk-start state, every token read before its own write. Returns (o [B, H, T, K], final
    weights, final momentum)."""
    outs = []
    for start, (co, before) in zip(range(0, q.shape[2], chunk_size), _chunk_coefficients(eta, alpha, beta, chunk_size)):
        sl = slice(start, start + chunk_size)
        lefts, rights = _update_factors(
            k[:, :, sl], v[:, :, sl], main_w, main_s, before, activation, max_grad_norm, dgd
        )
        outs.append(_read_before_write(q[:, :, sl], main_w, main_s, lefts, rights, before, activation))
        main_w, main_s = _advance(main_w, main_s, lefts, rights, co)
    return torch.cat(outs, dim=2), main_w, main_s


def _inner_grads(k, target, anchor, activation, outer):
    """Gradients of ||M(k) - target||^2 with respect to the anchor weights [B, H, d_in, d_out], with the target held
    constant: the loss is differentiated with respect to fresh copies used by the prediction only, so paths through
    the target (itself read from the anchor) do not count, while outer gradients still flow through everything."""
    with torch.enable_grad():
        params = [a.clone() if outer and a.requires_grad else a.detach().requires_grad_() for a in anchor]
        loss = (_residual_read(k, params, activation) - target).pow(2).sum()
        return torch.autograd.grad(loss, params, create_graph=outer)


def recurrent_self_modifying_titans(
    x: torch.Tensor,
    q: torch.Tensor,
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    state: SelfModState,
    *,
    static_k: torch.Tensor | None = None,
    static_v: torch.Tensor | None = None,
    momentum_decay: torch.Tensor | None = None,
    chunk_size: int = 16,
    memory_chunk_size: int = 16,
    eta_max: float = 0.1,
    dgd: bool = True,
    retention: bool = True,
    activation: str = "gelu",
    max_grad_norm: float | None = None,
) -> tuple[torch.Tensor, SelfModState]:
    """Token by token and memory by memory, with the inner gradients from autograd at each memory's chunk-start
    weights and the DGD term formed as the matrix (a_hat^T a_hat) W_{t-1} on the running weights (Eq. 91; independent
    of the factored closed form): the ground truth. O(T M) autograd calls."""
    check_chunk_sizes(chunk_size, memory_chunk_size)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "recurrent_self_modifying_titans takes its gradients with autograd: call it outside inference_mode"
        )
    outer = torch.is_grad_enabled()  # whether outer gradients must flow through the inner ones
    names = memory_names(static_k is not None, static_v is not None)
    index = {name: m for m, name in enumerate(names)}
    B, T, H, _ = x.shape
    acc, out_dtype = torch.promote_types(x.dtype, torch.float32), x.dtype
    x, q, static_k, static_v, gate_w, gate_b = _cast(acc, x, q, static_k, static_v, gate_w, gate_b)
    beta = x.new_zeros(H) if momentum_decay is None else momentum_decay.to(acc)
    beta = beta[:, None, None]  # [H, 1, 1]
    W = [[w[:, m].to(acc) for w in state.weights] for m in range(len(names))]  # per memory, per layer [B, H, ., .]
    S = [[s[:, m].to(acc) for s in state.momentum] for m in range(len(names))]
    anchor: list[list[torch.Tensor]] = [[] for _ in names]
    outs = []
    for t in range(T):
        for m in range(len(names)):
            if t % (memory_chunk_size if m == 0 else chunk_size) == 0:
                anchor[m] = list(W[m])

        def read(name, z):
            return _residual_read(z, anchor[index[name]], activation)

        xt = x[:, t, :, None, :]  # [B, H, 1, K]
        k = static_k[:, t, :, None, :] if static_k is not None else F.normalize(read("k", xt), dim=-1, eps=NORM_EPS)
        v = static_v[:, t, :, None, :] if static_v is not None else read("v", xt)
        eta, alpha = _gates(read("eta", xt), read("alpha", xt), gate_w, gate_b, eta_max, retention)  # [B, H, 1]
        eta, alpha = eta[..., None], alpha[..., None]  # [B, H, 1, 1]

        qt = q[:, t, :, None, :]
        outs.append(_residual_read(qt, W[0], activation).squeeze(2))  # before token t's write

        for m in range(len(names)):
            target = _residual_read(v, anchor[m], activation)  # the memory's own value for this token
            grads = _inner_grads(k, target, anchor[m], activation, outer)
            if max_grad_norm is not None:
                factor = clip_factor(sum(g.pow(2).sum((-1, -2)) for g in grads), max_grad_norm)[..., None, None]
                grads = [g * factor for g in grads]
            updates = list(grads)
            if dgd:
                a = k  # the layer's input at the anchor weights, [B, H, 1, d_in]
                for i, w in enumerate(anchor[m]):
                    u = F.normalize(a, dim=-1, eps=NORM_EPS)  # the layer's input at the anchor: a key of Eq. 88
                    updates[i] = updates[i] + (u.transpose(-1, -2) @ u) @ W[m][i]  # times the running weights
                    a = phi(a @ w, activation)
            S[m] = [beta * s - eta * u for s, u in zip(S[m], updates)]
            W[m] = [alpha * w + s for w, s in zip(W[m], S[m])]
    o = torch.stack(outs, dim=1).to(out_dtype)
    weights = tuple(torch.stack([W[m][i] for m in range(len(names))], dim=1) for i in range(len(W[0])))
    momentum = tuple(torch.stack([S[m][i] for m in range(len(names))], dim=1) for i in range(len(S[0])))
    return o, SelfModState(weights, momentum)
