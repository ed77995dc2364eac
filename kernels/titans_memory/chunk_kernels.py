"""Triton kernels for the Titans memory's chunk loop: one program per (batch, head) walks the chunks in order (forward)
or in reverse (backward), because each chunk's gradients are taken at the weights the previous chunk left.

Per chunk of C tokens (README beside this file, "The chunkwise form"), with the memory's last layer W2/S2 of input
width D_IN (D for depth 2, K for depth 1) and, for depth 2, the first layer W1/S1 of K x D:

    factors     z = k W1, a = phi(z), yk = a W2, delta2 = 2 (yk - v), delta1 = (delta2 W2^T) * phi'(z)
                (depth 1: a = k and there is no delta1); clipped factors ~delta = f * delta, f = min(1, G / ||u_s||)
    retrieval   Z1 = c (q W1) + d (q S1) - (Gamma * q k^T) ~delta1,  X = phi(Z1)   (depth 1: X = q)
                y  = c (X W2) + d (X S2) - (Gamma * X a^T) ~delta2
    new state   W_l' = c_end W_l + d_end S_l - a_l^T (g * ~delta_l),  S_l' = e_end S_l - a_l^T (h * ~delta_l)

HOPE's main memory (kernels/self_modifying) switches on RESIDUAL: the target becomes v + MLP(v) - k (the residual
memory's own read of v at the chunk-start weights); and with DGD, exact Delta Gradient Descent (Eq. 91): every
token's update a_l^T r_l keeps the gradient's left factor a_l (the layer input at the chunk start) and the right
factor solves, per chunk and layer, (I + diag(w) (Gamma * A A^T)) R = f Delta + diag(w) (c * (A W_0) + d * (A S_0)),
w = 1 / max(|a|^2, eps^2), with the read's coefficients c, d, Gamma (the state each token finds: HOPE reads before
its write). R = T (...) with T = (I + .)^-1 from the delta rule's unit_lower_inverse; the backward takes
dRHS = T^T dR and dA = -dRHS R^T (README of kernels/self_modifying, "Exact DGD").

The gate coefficients c, d, Gamma (per chunk, [BC] and [BC, BC]) and g, h, c_end, d_end, e_end (the state update's)
do not depend on the memory: the host computes them for all chunks at once, in differentiable PyTorch, and the
backward kernel returns their gradients. Everything is float32 in the kernels, whatever the input dtype; PREC says
how tiles are multiplied (half roundings on tensor cores for half-precision models).

The D-wide tensors (z, delta1, Z1 and, backward, their gradients) never sit whole in registers: every pass over them
walks D in tiles of BD columns and parks what a later pass needs in a per-program float32 scratch [NS, BC, D] (it
stays in L2). C x K, C x V and C x C tiles stay in registers. A launch runs chunks N0 .. N0 + NCH - 1 on state
buffers of SLOTS slots per program: chunk N0 + i reads slot i and writes slot i + 1, so no tile is overwritten while
it is still to be read, and the backward reads the same slots (the host recomputes them per segment for long
sequences, autograd.py). ``tl.debug_barrier()`` separates a pass that writes global memory from the pass that reads
it back.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.delta_rule.wy_fast import unit_lower_inverse

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _phi(z, ACT: tl.constexpr):
    if ACT == "gelu":  # the exact (erf) gelu
        return 0.5 * z * (1 + tl.math.erf(z * SQRT_HALF))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _phi_prime(z, ACT: tl.constexpr):
    if ACT == "gelu":  # Phi(z) + z N(z)
        return 0.5 * (1 + tl.math.erf(z * SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    else:  # s (1 + z (1 - s))
        s = tl.sigmoid(z)
        return s * (1 + z * (1 - s))


@triton.jit
def _phi_second(z, ACT: tl.constexpr):
    if ACT == "gelu":  # N(z) (2 - z^2)
        return tl.exp(-0.5 * z * z) * INV_SQRT_2PI * (2 - z * z)
    else:  # s (1 - s) (2 + z (1 - 2 s))
        s = tl.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b with float32 accumulation. PREC "bf16" / "fp16" multiplies roundings of the float32 tiles to the inputs'
    half type (tensor cores, half the shared memory; the state itself stays float32); "ieee" and "tf32" multiply the
    float32 tiles."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == "fp16":
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _ld(ptr, rows, cols, stride, m_rows, m_cols):
    """A [rows, cols] float32 tile of a row-major matrix with the given row stride (masked entries are 0)."""
    m = m_rows[:, None] & m_cols[None, :]
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, rows, cols, stride, m_rows, m_cols, x):
    tl.store(
        ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=m_rows[:, None] & m_cols[None, :]
    )


@triton.jit
def _ld_sc(ptr, rows, cols, DP: tl.constexpr):
    """A [BC, BD] tile of the program's scratch (padded to DP columns: no mask)."""
    return tl.load(ptr + rows[:, None] * DP + cols[None, :])


@triton.jit
def _st_sc(ptr, rows, cols, DP: tl.constexpr, x):
    tl.store(ptr + rows[:, None] * DP + cols[None, :], x)


@triton.jit
def _mlp(
    x,
    bos,
    b_x,
    W1,
    W2,
    o_c,
    m_c,
    o_k,
    m_k,
    o_v,
    m_v,
    o_d,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    D_IN: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """MLP(x) = phi(x W1) W2 (depth 1: x W2) for the chunk's rows of x [B, T, H, K] (``b_x`` the whole rows)."""
    b_m = tl.zeros([BC, BV], dtype=tl.float32)
    for t in range(0, D_IN, BD):
        o_t = t + o_d
        m_t = o_t < D_IN
        if DEPTH == 2:
            b_h = _phi(_dot(b_x, _ld(W1, o_k, o_t, D, m_k, m_t), PREC), ACT)
        else:
            b_h = _ld(x + bos * K, o_c, o_t, H * K, m_c, m_t)
        b_m += _dot(b_h, _ld(W2, o_t, o_v, V, m_t, m_v), PREC)
    return b_m


@triton.jit
def _factors(
    q,
    k,
    v,
    W1,
    W2,
    sc,
    bos,
    o_c,
    m_c,
    o_k,
    m_k,
    o_v,
    m_v,
    o_d,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    D_IN: tl.constexpr,
    DP: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    """The chunk's gradient factors at its start weights W1 [K, D], W2 [D_IN, V] (pointers to the chunk's slot):
    returns (q, k, delta2, yk = MLP(k), squared row norms |k|^2, |a|^2, |delta1|^2, |delta2|^2), all unclipped. For
    depth 2 it parks z = k W1 in scratch 0 and delta1 in scratch 1 (``sc`` points to the program's scratch). The
    target is v, or with ``RESIDUAL`` (HOPE's memories, K = V) the residual memory's own read of v minus k:
    ||k + MLP(k) - (v + MLP(v))||^2 is the MLP's loss with target v + MLP(v) - k."""
    b_q = _ld(q + bos * K, o_c, o_k, H * K, m_c, m_k)
    b_k = _ld(k + bos * K, o_c, o_k, H * K, m_c, m_k)
    b_yk = tl.zeros([BC, BV], dtype=tl.float32)
    b_na = tl.zeros([BC], dtype=tl.float32)
    for t in range(0, D_IN, BD):
        o_t = t + o_d
        m_t = o_t < D_IN
        if DEPTH == 2:
            b_z = _dot(b_k, _ld(W1, o_k, o_t, D, m_k, m_t), PREC)
            _st_sc(sc, o_c, o_t, DP, b_z)
            b_a = _phi(b_z, ACT)
        else:  # depth 1: the layer's input is the key itself
            b_a = _ld(k + bos * K, o_c, o_t, H * K, m_c, m_t)
        b_na += tl.sum(b_a * b_a, 1)
        b_yk += _dot(b_a, _ld(W2, o_t, o_v, V, m_t, m_v), PREC)
    b_target = _ld(v + bos * V, o_c, o_v, H * V, m_c, m_v)
    if RESIDUAL:
        b_target += (
            _mlp(
                v,
                bos,
                b_target,
                W1,
                W2,
                o_c,
                m_c,
                o_k,
                m_k,
                o_v,
                m_v,
                o_d,
                H,
                K,
                V,
                D,
                D_IN,
                BC,
                BV,
                BD,
                DEPTH,
                ACT,
                PREC,
            )
            - b_k
        )
    b_d2 = tl.where(m_c[:, None], 2 * (b_yk - b_target), 0.0)
    b_nd1 = tl.zeros([BC], dtype=tl.float32)
    if DEPTH == 2:
        tl.debug_barrier()
        for t in range(0, D, BD):
            o_t = t + o_d
            b_w2 = _ld(W2, o_t, o_v, V, o_t < D, m_v)
            b_d1 = _dot(b_d2, tl.trans(b_w2), PREC) * _phi_prime(_ld_sc(sc, o_c, o_t, DP), ACT)
            _st_sc(sc + BC * DP, o_c, o_t, DP, b_d1)
            b_nd1 += tl.sum(b_d1 * b_d1, 1)
        tl.debug_barrier()
    return b_q, b_k, b_d2, b_yk, tl.sum(b_k * b_k, 1), b_na, b_nd1, tl.sum(b_d2 * b_d2, 1)


@triton.jit
def _clip(b_nk, b_na, b_nd1, b_nd2, max_grad_norm, CLIP: tl.constexpr):
    """(f, df/dn^2): each token's gradient scale min(1, G / n), n^2 = sum_l |a_l|^2 |delta_l|^2 (a rank-1 gradient's
    Frobenius norm is the product of its factors' norms), and its derivative (0 below the threshold)."""
    n2 = b_nk * b_nd1 + b_na * b_nd2
    if CLIP:
        n = tl.sqrt(tl.maximum(n2, 1.1754943508222875e-38))
        f = max_grad_norm / tl.maximum(n, max_grad_norm)
        big = tl.maximum(n, max_grad_norm)  # no division by a tiny norm in the branch tl.where discards
        df = tl.where(n > max_grad_norm, -0.5 * max_grad_norm / (big * big * big), 0.0)
    else:
        f = tl.full(n2.shape, 1.0, tl.float32)
        df = tl.zeros(n2.shape, dtype=tl.float32)
    return f, df


@triton.jit
def _chunk(
    q,
    k,
    v,
    W1s,
    W2s,
    sc,
    i_b,
    i_h,
    i_bh,
    n,
    i,
    SLOTS,
    T,
    max_grad_norm,
    o_c,
    o_k,
    m_k,
    o_v,
    m_v,
    o_d,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    D_IN: tl.constexpr,
    DP: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    CLIP: tl.constexpr,
):
    """What both passes start a chunk with: its rows, its slot's state offsets, its gradient factors and the clip."""
    m_c = (o_c < C) & (n * C + o_c < T)
    bos = (i_b * T + n * C).to(tl.int64) * H + i_h
    slot = i_bh.to(tl.int64) * SLOTS + i
    b_q, b_k, b_d2, b_yk, b_nk, b_na, b_nd1, b_nd2 = _factors(
        q,
        k,
        v,
        W1s + slot * K * D,
        W2s + slot * D_IN * V,
        sc,
        bos,
        o_c,
        m_c,
        o_k,
        m_k,
        o_v,
        m_v,
        o_d,
        H,
        K,
        V,
        D,
        D_IN,
        DP,
        BC,
        BV,
        BD,
        DEPTH,
        ACT,
        PREC,
        RESIDUAL,
    )
    b_f, b_dfdn = _clip(b_nk, b_na, b_nd1, b_nd2, max_grad_norm, CLIP)
    return m_c, bos, slot, b_q, b_k, b_d2, b_yk, b_nk, b_na, b_nd1, b_nd2, b_f, b_dfdn


@triton.jit
def _coefficients(cc, cd, cg, ch, gam, ends, i_bh, n, NC, o_c, m_all, BC: tl.constexpr):
    """The chunk's gate coefficients from the host: the read's c, d, Gamma and the update's g, h, c_end, d_end, e_end
    (and the offsets their gradients go to)."""
    o_cf = (i_bh.to(tl.int64) * NC + n) * BC
    b_c, b_cd = tl.load(cc + o_cf + o_c), tl.load(cd + o_cf + o_c)
    b_g, b_h = tl.load(cg + o_cf + o_c), tl.load(ch + o_cf + o_c)
    b_gam = _ld(gam + o_cf * BC, o_c, o_c, BC, m_all, m_all)
    o_end = (i_bh.to(tl.int64) * NC + n) * 3
    c_end, d_end, e_end = tl.load(ends + o_end), tl.load(ends + o_end + 1), tl.load(ends + o_end + 2)
    return o_cf, o_end, b_c, b_cd, b_g, b_h, b_gam, c_end, d_end, e_end


@triton.jit
def _dgd_rights(
    k,
    b_k,
    b_f,
    b_d2,
    b_yk,
    b_nk,
    b_na,
    b_c,
    b_cd,
    b_gam,
    S1,
    S2,
    sc,
    sc_r1,
    bos,
    o_c,
    m_c,
    o_k,
    m_k,
    o_v,
    m_v,
    o_d,
    m_strict,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    DP: tl.constexpr,
    BC: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Exact DGD's right factors at the chunk-start momentum S1, S2 (z = k W1 in scratch 0, the unclipped delta1 in
    scratch 1): layer 1's D-wide r1 = T1 (f delta1 + w_k (c z + d k S1)) go to ``sc_r1`` tile by tile; returns the
    last layer's r2 = T2 (f delta2 + w_a (c yk + d a S2)) [BC, BV], and T1, T2, the last layer's input Gram a a^T,
    a S2, w_k, w_a for the backward (depth 1: the last layer's input is k, and T1 = T2)."""
    b_wk = 1.0 / tl.maximum(b_nk, 1e-12)  # 1 / max(|a|, eps)^2 with F.normalize's eps = 1e-6
    b_kk = _dot(b_k, tl.trans(b_k), "ieee")
    b_as = tl.zeros([BC, BV], dtype=tl.float32)
    if DEPTH == 2:
        b_T1 = unit_lower_inverse(tl.where(m_strict, b_wk[:, None] * b_gam * b_kk, 0.0), BC)
        b_aa = tl.zeros([BC, BC], dtype=tl.float32)
        for t in range(0, D, BD):
            o_t = t + o_d
            m_t = o_t < D
            b_z = _ld_sc(sc, o_c, o_t, DP)
            b_s1 = _ld(S1, o_k, o_t, D, m_k, m_t)
            b_rhs = _ld_sc(sc + BC * DP, o_c, o_t, DP) * b_f[:, None] + b_wk[:, None] * (
                b_c[:, None] * b_z + b_cd[:, None] * _dot(b_k, b_s1, PREC)
            )
            _st_sc(sc_r1, o_c, o_t, DP, _dot(b_T1, b_rhs, PREC))
            b_a = _phi(b_z, ACT)
            b_aa += _dot(b_a, tl.trans(b_a), "ieee")
            b_as += _dot(b_a, _ld(S2, o_t, o_v, V, m_t, m_v), PREC)
        b_wa = 1.0 / tl.maximum(b_na, 1e-12)
        b_T2 = unit_lower_inverse(tl.where(m_strict, b_wa[:, None] * b_gam * b_aa, 0.0), BC)
        tl.debug_barrier()  # r1 is read back from scratch
    else:  # depth 1: one layer, whose input is k itself
        for t in range(0, K, BD):
            o_t = t + o_d
            m_t = o_t < K
            b_as += _dot(_ld(k + bos * K, o_c, o_t, H * K, m_c, m_t), _ld(S2, o_t, o_v, V, m_t, m_v), PREC)
        b_aa, b_wa = b_kk, b_wk
        b_T2 = unit_lower_inverse(tl.where(m_strict, b_wa[:, None] * b_gam * b_aa, 0.0), BC)
        b_T1 = b_T2
    b_rhs2 = b_d2 * b_f[:, None] + b_wa[:, None] * (b_c[:, None] * b_yk + b_cd[:, None] * b_as)
    return _dot(b_T2, b_rhs2, PREC), b_T1, b_T2, b_kk, b_aa, b_as, b_wk, b_wa


@triton.jit(do_not_specialize=["T", "NC", "N0", "NCH", "SLOTS", "max_grad_norm"])
def titans_memory_fwd_kernel(
    q,
    k,
    v,
    cc,
    cd,
    cg,
    ch,
    gam,
    ends,
    W1s,
    S1s,
    W2s,
    S2s,
    y,
    sc,
    T,
    NC,
    N0,
    NCH,
    SLOTS,
    max_grad_norm,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    D_IN: tl.constexpr,
    DP: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    CLIP: tl.constexpr,
    PREC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DGD: tl.constexpr,
    STORE_Y: tl.constexpr,
):
    """Chunks N0 .. N0 + NCH - 1 from the state in slot 0 of the program's SLOTS-slot state buffers; chunk N0 + i
    reads slot i and writes slot i + 1. Without STORE_Y only the states are computed (the backward's recompute).
    Scratch: 0 z, 1 delta1 (with DGD overwritten by r1, the right factor)."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_c, o_k, o_v, o_d = tl.arange(0, BC), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BD)
    m_k, m_v, m_all = o_k < K, o_v < V, o_c < BC
    m_causal = o_c[:, None] >= o_c[None, :]
    m_strict = o_c[:, None] > o_c[None, :]
    sc = sc + i_bh.to(tl.int64) * 2 * BC * DP
    for i in range(NCH):
        n = N0 + i
        m_c, bos, slot, b_q, b_k, b_d2, b_yk, b_nk, b_na, b_nd1, b_nd2, b_f, _ = _chunk(
            q,
            k,
            v,
            W1s,
            W2s,
            sc,
            i_b,
            i_h,
            i_bh,
            n,
            i,
            SLOTS,
            T,
            max_grad_norm,
            o_c,
            o_k,
            m_k,
            o_v,
            m_v,
            o_d,
            H,
            K,
            V,
            D,
            D_IN,
            DP,
            C,
            BC,
            BV,
            BD,
            DEPTH,
            ACT,
            PREC,
            RESIDUAL,
            CLIP,
        )
        W1, S1, W2, S2 = W1s + slot * K * D, S1s + slot * K * D, W2s + slot * D_IN * V, S2s + slot * D_IN * V
        _, _, b_c, b_cd, b_g, b_h, b_gam, c_end, d_end, e_end = _coefficients(
            cc, cd, cg, ch, gam, ends, i_bh, n, NC, o_c, m_all, BC
        )
        if DGD:  # the right factors every use below takes: layer 1's into scratch 1, the last layer's here
            b_d2, _, _, _, _, _, _, _ = _dgd_rights(
                k,
                b_k,
                b_f,
                b_d2,
                b_yk,
                b_nk,
                b_na,
                b_c,
                b_cd,
                b_gam,
                S1,
                S2,
                sc,
                sc + BC * DP,
                bos,
                o_c,
                m_c,
                o_k,
                m_k,
                o_v,
                m_v,
                o_d,
                m_strict,
                H,
                K,
                V,
                D,
                DP,
                BC,
                BV,
                BD,
                DEPTH,
                ACT,
                PREC,
            )
        else:
            b_d2 = b_d2 * b_f[:, None]  # the clipped right factor every use below takes

        b_xw = tl.zeros([BC, BV], dtype=tl.float32)  # X W2 and X S2: the last layer's reads of the start state
        b_xs = tl.zeros([BC, BV], dtype=tl.float32)
        b_p2 = tl.zeros([BC, BC], dtype=tl.float32)  # X a^T: the last layer's scores
        if DEPTH == 2 and STORE_Y:
            b_m1 = tl.where(m_causal, b_gam * _dot(b_q, tl.trans(b_k), PREC), 0.0)
        for t in range(0, D_IN, BD):
            o_t = t + o_d
            m_t = o_t < D_IN
            if DEPTH == 2:
                b_w1, b_s1 = _ld(W1, o_k, o_t, D, m_k, m_t), _ld(S1, o_k, o_t, D, m_k, m_t)
                b_z = _ld_sc(sc, o_c, o_t, DP)
                b_a = _phi(b_z, ACT)
                b_d1 = _ld_sc(sc + BC * DP, o_c, o_t, DP)
                if not DGD:
                    b_d1 = b_d1 * b_f[:, None]
                if STORE_Y:
                    b_z1 = b_c[:, None] * _dot(b_q, b_w1, PREC) + b_cd[:, None] * _dot(b_q, b_s1, PREC)
                    b_x = _phi(b_z1 - _dot(b_m1, b_d1, PREC), ACT)
                b_kt = tl.trans(b_k)
                _st(
                    W1 + K * D,
                    o_k,
                    o_t,
                    D,
                    m_k,
                    m_t,
                    c_end * b_w1 + d_end * b_s1 - _dot(b_kt, b_g[:, None] * b_d1, PREC),
                )
                _st(S1 + K * D, o_k, o_t, D, m_k, m_t, e_end * b_s1 - _dot(b_kt, b_h[:, None] * b_d1, PREC))
            else:
                b_a = _ld(k + bos * K, o_c, o_t, H * K, m_c, m_t)
                if STORE_Y:
                    b_x = _ld(q + bos * K, o_c, o_t, H * K, m_c, m_t)
            b_w2, b_s2 = _ld(W2, o_t, o_v, V, m_t, m_v), _ld(S2, o_t, o_v, V, m_t, m_v)
            if STORE_Y:
                b_xw += _dot(b_x, b_w2, PREC)
                b_xs += _dot(b_x, b_s2, PREC)
                b_p2 += _dot(b_x, tl.trans(b_a), PREC)
            b_at = tl.trans(b_a)
            b_new_w2 = c_end * b_w2 + d_end * b_s2 - _dot(b_at, b_g[:, None] * b_d2, PREC)
            _st(W2 + D_IN * V, o_t, o_v, V, m_t, m_v, b_new_w2)
            _st(S2 + D_IN * V, o_t, o_v, V, m_t, m_v, e_end * b_s2 - _dot(b_at, b_h[:, None] * b_d2, PREC))
        if STORE_Y:
            b_m2 = tl.where(m_causal, b_gam * b_p2, 0.0)
            b_y = b_c[:, None] * b_xw + b_cd[:, None] * b_xs - _dot(b_m2, b_d2, PREC)
            _st(y + bos * V, o_c, o_v, H * V, m_c, m_v, b_y)
        tl.debug_barrier()  # the next chunk reads the state tiles this one wrote


@triton.jit(do_not_specialize=["T", "NC", "N0", "NCH", "SLOTS", "max_grad_norm"])
def titans_memory_bwd_kernel(
    q,
    k,
    v,
    cc,
    cd,
    cg,
    ch,
    gam,
    ends,
    W1s,
    S1s,
    W2s,
    S2s,
    dy,
    dW1,
    dS1,
    dW2,
    dS2,
    dq,
    dk,
    dv,
    dcc,
    dcd,
    dcg,
    dch,
    dgam,
    dends,
    sc,
    T,
    NC,
    N0,
    NCH,
    SLOTS,
    max_grad_norm,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    D: tl.constexpr,
    D_IN: tl.constexpr,
    DP: tl.constexpr,
    C: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
    DEPTH: tl.constexpr,
    ACT: tl.constexpr,
    CLIP: tl.constexpr,
    PREC: tl.constexpr,
    RESIDUAL: tl.constexpr,
    DGD: tl.constexpr,
):
    """Chunks in reverse. dW1 .. dS2 hold the gradient w.r.t. the state after the chunk and are rewritten in place
    into the gradient w.r.t. the state before it (each tile is read before it is written, by the same program).
    Scratch: 0 z, 1 delta1 (unclipped), 2 Z1 then dL/dz, 3 dL/da (last layer's input), 4 dL/d~delta1 (with DGD: the
    gradient of layer 1's right-hand side, T1^T dL/dr1), 5 (DGD) r1, layer 1's right factor."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_c, o_k, o_v, o_d = tl.arange(0, BC), tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BD)
    m_k, m_v, m_all = o_k < K, o_v < V, o_c < BC
    m_causal = o_c[:, None] >= o_c[None, :]
    m_strict = o_c[:, None] > o_c[None, :]
    sc = sc + i_bh.to(tl.int64) * (6 if DGD else 5) * BC * DP
    sc_z, sc_d1, sc_zq, sc_da, sc_dd1 = sc, sc + BC * DP, sc + 2 * BC * DP, sc + 3 * BC * DP, sc + 4 * BC * DP
    sc_r1 = sc + 5 * BC * DP
    dW1, dS1 = dW1 + i_bh.to(tl.int64) * K * D, dS1 + i_bh.to(tl.int64) * K * D
    dW2, dS2 = dW2 + i_bh.to(tl.int64) * D_IN * V, dS2 + i_bh.to(tl.int64) * D_IN * V
    for i_n in range(NCH):
        i = NCH - 1 - i_n
        n = N0 + i
        m_c, bos, slot, b_q, b_k, b_d2, b_yk, b_nk, b_na, b_nd1, b_nd2, b_f, b_dfdn = _chunk(
            q,
            k,
            v,
            W1s,
            W2s,
            sc,
            i_b,
            i_h,
            i_bh,
            n,
            i,
            SLOTS,
            T,
            max_grad_norm,
            o_c,
            o_k,
            m_k,
            o_v,
            m_v,
            o_d,
            H,
            K,
            V,
            D,
            D_IN,
            DP,
            C,
            BC,
            BV,
            BD,
            DEPTH,
            ACT,
            PREC,
            RESIDUAL,
            CLIP,
        )
        W1, S1, W2, S2 = W1s + slot * K * D, S1s + slot * K * D, W2s + slot * D_IN * V, S2s + slot * D_IN * V
        o_cf, o_end, b_c, b_cd, b_g, b_h, b_gam, c_end, d_end, e_end = _coefficients(
            cc, cd, cg, ch, gam, ends, i_bh, n, NC, o_c, m_all, BC
        )
        if DGD:  # the right factors the read and the update take (layer 1's in scratch 5), and what made them
            b_d2c, b_T1, b_T2, b_kk, b_aa, b_as0, b_wk, b_wa = _dgd_rights(
                k,
                b_k,
                b_f,
                b_d2,
                b_yk,
                b_nk,
                b_na,
                b_c,
                b_cd,
                b_gam,
                S1,
                S2,
                sc,
                sc_r1,
                bos,
                o_c,
                m_c,
                o_k,
                m_k,
                o_v,
                m_v,
                o_d,
                m_strict,
                H,
                K,
                V,
                D,
                DP,
                BC,
                BV,
                BD,
                DEPTH,
                ACT,
                PREC,
            )
        else:
            b_d2c = b_d2 * b_f[:, None]  # the right factor the read and the update take
        b_dy = _ld(dy + bos * V, o_c, o_v, H * V, m_c, m_v)

        # pass 1: the forward read again (Z1 parked for the next pass), the last layer's start-state reads and scores
        b_xw = tl.zeros([BC, BV], dtype=tl.float32)
        b_xs = tl.zeros([BC, BV], dtype=tl.float32)
        b_p2 = tl.zeros([BC, BC], dtype=tl.float32)
        if DEPTH == 2:
            b_p1 = _dot(b_q, tl.trans(b_k), PREC)
            b_m1 = tl.where(m_causal, b_gam * b_p1, 0.0)
        for t in range(0, D_IN, BD):
            o_t = t + o_d
            m_t = o_t < D_IN
            if DEPTH == 2:
                b_z = _ld_sc(sc_z, o_c, o_t, DP)
                if DGD:
                    b_d1 = _ld_sc(sc_r1, o_c, o_t, DP)
                else:
                    b_d1 = _ld_sc(sc_d1, o_c, o_t, DP) * b_f[:, None]
                b_z1 = (
                    b_c[:, None] * _dot(b_q, _ld(W1, o_k, o_t, D, m_k, m_t), PREC)
                    + b_cd[:, None] * _dot(b_q, _ld(S1, o_k, o_t, D, m_k, m_t), PREC)
                    - _dot(b_m1, b_d1, PREC)
                )
                _st_sc(sc_zq, o_c, o_t, DP, b_z1)
                b_x = _phi(b_z1, ACT)
                b_a = _phi(b_z, ACT)
            else:
                b_a = _ld(k + bos * K, o_c, o_t, H * K, m_c, m_t)
                b_x = _ld(q + bos * K, o_c, o_t, H * K, m_c, m_t)
            b_xw += _dot(b_x, _ld(W2, o_t, o_v, V, m_t, m_v), PREC)
            b_xs += _dot(b_x, _ld(S2, o_t, o_v, V, m_t, m_v), PREC)
            b_p2 += _dot(b_x, tl.trans(b_a), PREC)
        tl.debug_barrier()
        # the last layer's read y = c (X W2) + d (X S2) - (Gamma * X a^T) ~delta2
        b_dc = tl.sum(b_dy * b_xw, 1)
        b_dcd = tl.sum(b_dy * b_xs, 1)
        b_m2 = tl.where(m_causal, b_gam * b_p2, 0.0)
        b_dm2 = -_dot(b_dy, tl.trans(b_d2c), PREC)
        b_dgam = tl.where(m_causal, b_dm2 * b_p2, 0.0)
        b_dp2 = tl.where(m_causal, b_dm2 * b_gam, 0.0)
        b_dd2c = -_dot(tl.trans(b_m2), b_dy, PREC)
        b_cdy, b_ddy = b_c[:, None] * b_dy, b_cd[:, None] * b_dy

        # pass 2: through the reads into X, a and the start state; the state update's share; layer 1's read
        b_dm1 = tl.zeros([BC, BC], dtype=tl.float32)
        b_dq = tl.zeros([BC, BK], dtype=tl.float32)
        b_dk = tl.zeros([BC, BK], dtype=tl.float32)
        b_df = tl.zeros([BC], dtype=tl.float32)
        b_dg = tl.zeros([BC], dtype=tl.float32)
        b_dh = tl.zeros([BC], dtype=tl.float32)
        b_aw = tl.zeros([BC, BV], dtype=tl.float32)  # a dW2' and a dS2'
        b_as = tl.zeros([BC, BV], dtype=tl.float32)
        b_dA1 = tl.zeros([BC, BC], dtype=tl.float32)  # DGD: dL/dA1 of layer 1's system, over the D tiles
        b_dwk = tl.zeros([BC], dtype=tl.float32)  # DGD: dL/dw_k
        dc_end, dd_end, de_end = 0.0, 0.0, 0.0  # <W, dW'>, <S, dW'>, <S, dS'> over every layer
        for t in range(0, D_IN, BD):
            o_t = t + o_d
            m_t = o_t < D_IN
            b_w2, b_s2 = _ld(W2, o_t, o_v, V, m_t, m_v), _ld(S2, o_t, o_v, V, m_t, m_v)
            b_dw2, b_ds2 = _ld(dW2, o_t, o_v, V, m_t, m_v), _ld(dS2, o_t, o_v, V, m_t, m_v)
            if DEPTH == 2:
                b_z1 = _ld_sc(sc_zq, o_c, o_t, DP)
                b_x = _phi(b_z1, ACT)
                b_z = _ld_sc(sc_z, o_c, o_t, DP)
                b_a = _phi(b_z, ACT)
            else:
                b_a = _ld(k + bos * K, o_c, o_t, H * K, m_c, m_t)
                b_x = _ld(q + bos * K, o_c, o_t, H * K, m_c, m_t)
            b_dx = _dot(b_cdy, tl.trans(b_w2), PREC) + _dot(b_ddy, tl.trans(b_s2), PREC) + _dot(b_dp2, b_a, PREC)
            b_da = (
                _dot(tl.trans(b_dp2), b_x, PREC)
                - _dot(b_g[:, None] * b_d2c, tl.trans(b_dw2), PREC)
                - _dot(b_h[:, None] * b_d2c, tl.trans(b_ds2), PREC)
            )
            _st_sc(sc_da, o_c, o_t, DP, b_da)
            b_aw += _dot(b_a, b_dw2, PREC)
            b_as += _dot(b_a, b_ds2, PREC)
            dc_end += tl.sum(b_w2 * b_dw2)
            dd_end += tl.sum(b_s2 * b_dw2)
            de_end += tl.sum(b_s2 * b_ds2)
            b_xt = tl.trans(b_x)
            _st(dW2, o_t, o_v, V, m_t, m_v, c_end * b_dw2 + _dot(b_xt, b_cdy, PREC))
            _st(dS2, o_t, o_v, V, m_t, m_v, d_end * b_dw2 + e_end * b_ds2 + _dot(b_xt, b_ddy, PREC))
            if DEPTH == 2:
                b_w1, b_s1 = _ld(W1, o_k, o_t, D, m_k, m_t), _ld(S1, o_k, o_t, D, m_k, m_t)
                b_dw1, b_ds1 = _ld(dW1, o_k, o_t, D, m_k, m_t), _ld(dS1, o_k, o_t, D, m_k, m_t)
                b_d1 = _ld_sc(sc_d1, o_c, o_t, DP)
                if DGD:
                    b_d1c = _ld_sc(sc_r1, o_c, o_t, DP)
                else:
                    b_d1c = b_d1 * b_f[:, None]
                b_dz1 = b_dx * _phi_prime(b_z1, ACT)
                b_dm1 -= _dot(b_dz1, tl.trans(b_d1c), PREC)
                b_dc += tl.sum(b_dz1 * _dot(b_q, b_w1, PREC), 1)
                b_dcd += tl.sum(b_dz1 * _dot(b_q, b_s1, PREC), 1)
                b_cdz, b_ddz = b_c[:, None] * b_dz1, b_cd[:, None] * b_dz1
                b_dq += _dot(b_cdz, tl.trans(b_w1), PREC) + _dot(b_ddz, tl.trans(b_s1), PREC)
                b_kw, b_ks = _dot(b_k, b_dw1, PREC), _dot(b_k, b_ds1, PREC)
                b_dd1c = -_dot(tl.trans(b_m1), b_dz1, PREC) - b_g[:, None] * b_kw - b_h[:, None] * b_ks
                if DGD:  # through r1 = T1 rhs1: dL/drhs1 = T1^T dL/dr1, and dL/dA1 = -dL/drhs1 r1^T
                    b_dd1c = _dot(tl.trans(b_T1), b_dd1c, PREC)
                    b_dA1 -= _dot(b_dd1c, tl.trans(b_d1c), "ieee")
                    # rhs1 = f delta1 + w_k (c z + d k S1): into c, d, w_k and k S1 (z's share joins dz in pass 3)
                    b_ks1 = _dot(b_k, b_s1, PREC)
                    b_dc += b_wk * tl.sum(b_dd1c * b_z, 1)
                    b_dcd += b_wk * tl.sum(b_dd1c * b_ks1, 1)
                    b_dwk += tl.sum(b_dd1c * (b_c[:, None] * b_z + b_cd[:, None] * b_ks1), 1)
                    b_wds1 = (b_wk * b_cd)[:, None] * b_dd1c  # dL/d(k S1)
                    b_dk += _dot(b_wds1, tl.trans(b_s1), PREC)
                _st_sc(sc_dd1, o_c, o_t, DP, b_dd1c)
                b_dg -= tl.sum(b_kw * b_d1c, 1)
                b_dh -= tl.sum(b_ks * b_d1c, 1)
                b_df += tl.sum(b_dd1c * b_d1, 1)
                b_dk -= _dot(b_g[:, None] * b_d1c, tl.trans(b_dw1), PREC) + _dot(
                    b_h[:, None] * b_d1c, tl.trans(b_ds1), PREC
                )
                dc_end += tl.sum(b_w1 * b_dw1)
                dd_end += tl.sum(b_s1 * b_dw1)
                de_end += tl.sum(b_s1 * b_ds1)
                b_qt = tl.trans(b_q)
                _st(dW1, o_k, o_t, D, m_k, m_t, c_end * b_dw1 + _dot(b_qt, b_cdz, PREC))
                b_new_ds1 = d_end * b_dw1 + e_end * b_ds1 + _dot(b_qt, b_ddz, PREC)
                if DGD:
                    b_new_ds1 += _dot(tl.trans(b_k), b_wds1, PREC)
                _st(dS1, o_k, o_t, D, m_k, m_t, b_new_ds1)
            else:
                _st(dq + bos * K, o_c, o_t, H * K, m_c, m_t, b_dx)
        tl.debug_barrier()

        # the last layer's state update: W2' = ... - a^T (g * ~delta2), S2' = ... - a^T (h * ~delta2)
        b_dd2c -= b_g[:, None] * b_aw + b_h[:, None] * b_as
        b_dg -= tl.sum(b_aw * b_d2c, 1)
        b_dh -= tl.sum(b_as * b_d2c, 1)
        if DGD:  # through r2 = T2 rhs2, rhs2 = f delta2 + w_a (c yk + d a S2)
            b_dd2c = _dot(tl.trans(b_T2), b_dd2c, PREC)  # dL/drhs2
            b_dA2 = tl.where(m_strict, -_dot(b_dd2c, tl.trans(b_d2c), "ieee"), 0.0)
            b_dgam += b_dA2 * b_wa[:, None] * b_aa
            b_P2 = b_dA2 * b_wa[:, None] * b_gam  # dL/d(a a^T)
            b_dwa = tl.sum(b_dA2 * b_gam * b_aa, 1) + tl.sum(b_dd2c * (b_c[:, None] * b_yk + b_cd[:, None] * b_as0), 1)
            b_dc += b_wa * tl.sum(b_dd2c * b_yk, 1)
            b_dcd += b_wa * tl.sum(b_dd2c * b_as0, 1)
            b_was = (b_wa * b_cd)[:, None] * b_dd2c  # dL/d(a S2)
            b_dna = tl.where(b_na > 1e-12, -b_wa * b_wa, 0.0) * b_dwa  # w_a = 1 / max(|a|^2, eps^2)
        else:
            b_dna = tl.zeros([BC], dtype=tl.float32)
        b_df += tl.sum(b_dd2c * b_d2, 1)
        # through the clip ~delta_l = f delta_l, f = f(n^2), n^2 = |k|^2 |delta1|^2 + |a|^2 |delta2|^2
        b_dn2 = b_df * b_dfdn
        b_dd2 = b_f[:, None] * b_dd2c + 2 * b_d2 * (b_na * b_dn2)[:, None]
        if DEPTH == 2:
            b_dp1 = tl.where(m_causal, b_dm1 * b_gam, 0.0)
            b_dgam += tl.where(m_causal, b_dm1 * b_p1, 0.0)
            b_dq += _dot(b_dp1, b_k, PREC)
            b_dk += _dot(tl.trans(b_dp1), b_q, PREC) + 2 * b_k * (b_nd1 * b_dn2)[:, None]
            if DGD:  # through layer 1's system A1 = diag(w_k) (Gamma * k k^T) and w_k = 1 / max(|k|^2, eps^2)
                b_dA1 = tl.where(m_strict, b_dA1, 0.0)
                b_dgam += b_dA1 * b_wk[:, None] * b_kk
                b_P1 = b_dA1 * b_wk[:, None] * b_gam
                b_dk += _dot(b_P1 + tl.trans(b_P1), b_k, PREC)
                b_dwk += tl.sum(b_dA1 * b_gam * b_kk, 1)
                b_dk += 2 * b_k * (tl.where(b_nk > 1e-12, -b_wk * b_wk, 0.0) * b_dwk)[:, None]
            # pass 3: through delta1 = (delta2 W2^T) * phi'(z)
            for t in range(0, D, BD):
                o_t = t + o_d
                m_t = o_t < D
                b_z = _ld_sc(sc_z, o_c, o_t, DP)
                b_d1 = _ld_sc(sc_d1, o_c, o_t, DP)
                b_dd1c = _ld_sc(sc_dd1, o_c, o_t, DP)
                b_dd1 = b_f[:, None] * b_dd1c + 2 * b_d1 * (b_nk * b_dn2)[:, None]
                b_w2 = _ld(W2, o_t, o_v, V, m_t, m_v)
                b_e = b_dd1 * _phi_prime(b_z, ACT)
                b_dd2 += _dot(b_e, b_w2, PREC)
                _st(dW2, o_t, o_v, V, m_t, m_v, _ld(dW2, o_t, o_v, V, m_t, m_v) + _dot(tl.trans(b_e), b_d2, PREC))
                b_dz = b_dd1 * _dot(b_d2, tl.trans(b_w2), PREC) * _phi_second(b_z, ACT)
                if DGD:  # rhs1's w_k c z
                    b_dz += (b_wk * b_c)[:, None] * b_dd1c
                _st_sc(sc_zq, o_c, o_t, DP, b_dz)
            tl.debug_barrier()
        # delta2 = 2 (yk - target); the target is v (or v + MLP(v) - k)
        b_dyk = 2 * b_dd2
        if DGD:  # rhs2's w_a c yk
            b_dyk += (b_wa * b_c)[:, None] * b_dd2c
        b_dt = -2 * b_dd2
        # pass 4: through the forward of the keys, a = phi(k W1), yk = a W2 (depth 1: yk = k W2)
        for t in range(0, D_IN, BD):
            o_t = t + o_d
            m_t = o_t < D_IN
            b_w2 = _ld(W2, o_t, o_v, V, m_t, m_v)
            if DEPTH == 2:
                b_z = _ld_sc(sc_z, o_c, o_t, DP)
                b_a = _phi(b_z, ACT)
            else:
                b_a = _ld(k + bos * K, o_c, o_t, H * K, m_c, m_t)
            b_da = (
                _ld_sc(sc_da, o_c, o_t, DP)
                + 2 * b_a * (b_nd2 * b_dn2 + b_dna)[:, None]
                + _dot(b_dyk, tl.trans(b_w2), PREC)
            )
            _st(dW2, o_t, o_v, V, m_t, m_v, _ld(dW2, o_t, o_v, V, m_t, m_v) + _dot(tl.trans(b_a), b_dyk, PREC))
            if DGD:  # the last layer's system (a a^T) and rhs2's a S2
                b_s2 = _ld(S2, o_t, o_v, V, m_t, m_v)
                b_da += _dot(b_P2 + tl.trans(b_P2), b_a, PREC) + _dot(b_was, tl.trans(b_s2), PREC)
                _st(dS2, o_t, o_v, V, m_t, m_v, _ld(dS2, o_t, o_v, V, m_t, m_v) + _dot(tl.trans(b_a), b_was, PREC))
            if DEPTH == 2:
                b_dz = _ld_sc(sc_zq, o_c, o_t, DP) + b_da * _phi_prime(b_z, ACT)
                b_dk += _dot(b_dz, tl.trans(_ld(W1, o_k, o_t, D, m_k, m_t)), PREC)
                _st(dW1, o_k, o_t, D, m_k, m_t, _ld(dW1, o_k, o_t, D, m_k, m_t) + _dot(tl.trans(b_k), b_dz, PREC))
            else:
                _st(dk + bos * K, o_c, o_t, H * K, m_c, m_t, b_da)  # depth 1: a = k
        b_dv = b_dt
        if RESIDUAL:  # pass 5: through the target's MLP(v) at the start weights, and its -k
            tl.debug_barrier()
            b_v = _ld(v + bos * V, o_c, o_v, H * V, m_c, m_v)
            for t in range(0, D_IN, BD):
                o_t = t + o_d
                m_t = o_t < D_IN
                b_w2 = _ld(W2, o_t, o_v, V, m_t, m_v)
                if DEPTH == 2:
                    b_w1 = _ld(W1, o_k, o_t, D, m_k, m_t)
                    b_zv = _dot(b_v, b_w1, PREC)
                    b_hv = _phi(b_zv, ACT)
                    b_dzv = _dot(b_dt, tl.trans(b_w2), PREC) * _phi_prime(b_zv, ACT)
                    _st(dW1, o_k, o_t, D, m_k, m_t, _ld(dW1, o_k, o_t, D, m_k, m_t) + _dot(tl.trans(b_v), b_dzv, PREC))
                    b_dv += _dot(b_dzv, tl.trans(b_w1), PREC)
                else:
                    b_hv = _ld(v + bos * V, o_c, o_t, H * V, m_c, m_t)
                _st(dW2, o_t, o_v, V, m_t, m_v, _ld(dW2, o_t, o_v, V, m_t, m_v) + _dot(tl.trans(b_hv), b_dt, PREC))
            if DEPTH == 2:
                b_dk -= b_dt
            else:  # dk was written tile by tile in pass 4
                _st(dk + bos * K, o_c, o_k, H * K, m_c, m_k, _ld(dk + bos * K, o_c, o_k, H * K, m_c, m_k) - b_dt)
        _st(dv + bos * V, o_c, o_v, H * V, m_c, m_v, b_dv)
        if RESIDUAL and DEPTH == 1:  # and dv gets MLP(v) = v W2's share tile by tile
            tl.debug_barrier()
            for t in range(0, D_IN, BD):
                o_t = t + o_d
                m_t = o_t < D_IN
                b_dvt = _dot(b_dt, tl.trans(_ld(W2, o_t, o_v, V, m_t, m_v)), PREC)
                _st(dv + bos * V, o_c, o_t, H * V, m_c, m_t, _ld(dv + bos * V, o_c, o_t, H * V, m_c, m_t) + b_dvt)
        if DEPTH == 2:
            _st(dq + bos * K, o_c, o_k, H * K, m_c, m_k, b_dq)
            _st(dk + bos * K, o_c, o_k, H * K, m_c, m_k, b_dk)
        tl.store(dcc + o_cf + o_c, b_dc)
        tl.store(dcd + o_cf + o_c, b_dcd)
        tl.store(dcg + o_cf + o_c, b_dg)
        tl.store(dch + o_cf + o_c, b_dh)
        _st(dgam + o_cf * BC, o_c, o_c, BC, m_all, m_all, b_dgam)
        tl.store(dends + o_end, dc_end)
        tl.store(dends + o_end + 1, dd_end)
        tl.store(dends + o_end + 2, de_end)
        tl.debug_barrier()  # the previous chunk reads the state gradients this one wrote
