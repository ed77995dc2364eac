"""Triton kernels for the chunk-local part of the gated delta rule: the UT/WY transform and its backward.

Per chunk of BT tokens (README, "Chunkwise form"): gamma = cumsum(g) inside the chunk,
A = strictLower(diag(beta) (Gamma * K K^T)), T = (I + A)^{-1} by forward substitution, w = T diag(beta e^gamma) K and
u = T diag(beta) V. Nothing here crosses chunk boundaries, so the grid is one program per (chunk, batch x head).

Layout: q, k [B, T, H, K], v [B, T, H, V], beta and g [B, T, H]; token t of sequence b and head h is row
``(b * T + t) * H + h`` of every tensor. Each program moves its pointers to its chunk's first row with one 64-bit
scalar (``bos``) and addresses the chunk with 32-bit offsets (``o_th = i * H`` for token i of the chunk).
T (the inverse) is stored as [B, T, H, BT] in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_rule.tiling import block, num_warps


@triton.jit
def unit_lower_inverse(b_A, BT: tl.constexpr):
    """(I + A)^{-1} for a strictly lower-triangular [BT, BT] float32 block A (BT = 16, 32 or 64), exactly.

    With D = I + (A's 16 x 16 diagonal blocks) and L = the rest of A: (I + A)^{-1} = (I + N)^{-1} D^{-1}, N = D^{-1} L.
    D^{-1} comes from forward substitution, T_i = e_i - sum_{j<i} A_ij T_j, in 15 steps that solve the BT/16 diagonal
    blocks side by side; N is strictly block-lower, so N^4 = 0 and (I + N)^{-1} = (I - N)(I + N^2) for up to four
    blocks, a few matmuls. Products run in IEEE fp32: the inverse feeds every later step.
    """
    NC: tl.constexpr = BT // 16
    o_c = tl.arange(0, 16)
    o_b = tl.arange(0, NC)
    m_diag = o_b[:, None, None, None] == o_b[None, None, :, None]  # [NC, 1, NC, 1]: block row == block column
    b_Ad = tl.sum(tl.where(m_diag, tl.reshape(b_A, (NC, 16, NC, 16)), 0.0), axis=2)  # [NC, 16, 16] diagonal blocks
    b_Xd = tl.zeros([NC, 16, 16], dtype=tl.float32) + tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0)[None, :, :]
    for i in range(1, 16):
        m_row = (o_c == i)[None, :, None]
        b_a = tl.sum(tl.where(m_row, b_Ad, 0.0), axis=1)  # [NC, 16]: row i of every diagonal block
        b_row = tl.where(o_c == i, 1.0, 0.0)[None, :] - tl.sum(b_a[:, :, None] * b_Xd, axis=1)
        b_Xd = tl.where(m_row, b_row[:, None, :], b_Xd)
    b_T = tl.reshape(tl.where(m_diag, b_Xd[:, :, None, :], 0.0), (BT, BT))  # D^{-1}, block diagonal
    if NC > 1:
        o_i = tl.arange(0, BT)
        b_N = tl.dot(b_T, tl.where(o_i[:, None] // 16 > o_i[None, :] // 16, b_A, 0.0), input_precision="ieee")
        b_P = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0) - b_N
        if NC > 2:
            b_N2 = tl.dot(b_N, b_N, input_precision="ieee")
            b_P += b_N2 - tl.dot(b_N, b_N2, input_precision="ieee")
        b_T = tl.dot(b_P, b_T, input_precision="ieee")
    return b_T


@triton.jit(do_not_specialize=["T"])
def prepare_wy_repr_fwd_kernel(
    k,
    v,
    beta,
    g,
    gc,
    A,
    w,
    u,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = k.dtype.element_ty

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    # the chunk's first row as a 64-bit scalar; offsets inside the chunk stay 32-bit (fewer registers per tile)
    bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    k, v, beta, A, w, u = k + bos * K, v + bos * V, beta + bos, A + bos * BT, w + bos * K, u + bos * V
    o_th = o_i * H  # token rows of beta, g and A inside the chunk
    b_beta = tl.load(beta + o_th, mask=m_t, other=0.0).to(tl.float32)
    if USE_G:
        g, gc = g + bos, gc + bos
        # chunk-local log decay gamma_i = g_1 + ... + g_i; padded tokens add 0, so they repeat the last gamma
        b_g = tl.cumsum(tl.load(g + o_th, mask=m_t, other=0.0).to(tl.float32), axis=0)
        tl.store(gc + o_th, b_g, mask=m_t)

    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_k = tl.load(k + o_th[:, None] * K + o_k[None, :], mask=m_t[:, None] & (o_k < K)[None, :], other=0.0)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
    m_A = o_i[:, None] > o_i[None, :]
    if USE_G:
        # masked before exp: above the diagonal gamma_i - gamma_j > 0 could overflow
        b_A *= tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0.0))
    b_A = tl.where(m_A, b_A * b_beta[:, None], 0.0)

    b_T = unit_lower_inverse(b_A, BT)
    tl.store(A + o_th[:, None] * BT + o_i[None, :], b_T, mask=m_t[:, None])

    b_Tc = b_T.to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_k = tl.load(k + o_th[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        b_kb = b_k * b_beta[:, None]
        if USE_G:
            b_kb *= tl.exp(b_g)[:, None]
        b_w = tl.dot(b_Tc, b_kb.to(DT), input_precision=DOT_PRECISION)
        tl.store(w + o_th[:, None] * K + o_k[None, :], b_w.to(w.dtype.element_ty), mask=m_tk)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        b_v = tl.load(v + o_th[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_u = tl.dot(b_Tc, (b_v * b_beta[:, None]).to(DT), input_precision=DOT_PRECISION)
        tl.store(u + o_th[:, None] * V + o_v[None, :], b_u.to(u.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def prepare_wy_repr_bwd_kernel(
    k,
    v,
    beta,
    gc,
    A,
    dw,
    du,
    dk,
    dv,
    dbeta,
    dgc,
    dg,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Backward of w, u through T = (I + A)^{-1}, then of A through k, beta and gamma.

    ``dk`` holds the key gradient of the other kernels on entry (float32) and gets this chunk's share added; ``dgc``
    holds their gradient w.r.t. the chunk-local cumsum gamma, and ``dg`` receives dg = reverse cumsum of the total.
    """
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = k.dtype.element_ty

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    k, v, beta, A, dw, du = k + bos * K, v + bos * V, beta + bos, A + bos * BT, dw + bos * K, du + bos * V
    dk, dv, dbeta = dk + bos * K, dv + bos * V, dbeta + bos
    o_th = o_i * H
    m_A = o_i[:, None] > o_i[None, :]
    b_beta = tl.load(beta + o_th, mask=m_t, other=0.0).to(tl.float32)
    b_T = tl.load(A + o_th[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)
    b_Tc = b_T.to(DT)
    b_bg = b_beta  # beta_i e^{gamma_i}: the row scale of w's right-hand side
    if USE_G:
        gc, dgc, dg = gc + bos, dgc + bos, dg + bos
        b_g = tl.load(gc + o_th, mask=m_t, other=0.0)
        b_bg = b_beta * tl.exp(b_g)
        b_dg = tl.load(dgc + o_th, mask=m_t, other=0.0)

    b_dT = tl.zeros([BT, BT], dtype=tl.float32)
    b_KK = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    # w = T X with X = diag(beta e^gamma) K:  dT += dw X^T,  dX = T^T dw
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        o_tk = o_th[:, None] * K + o_k[None, :]
        b_k = tl.load(k + o_tk, mask=m_tk, other=0.0)
        b_dw = tl.load(dw + o_tk, mask=m_tk, other=0.0)
        b_KK += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)
        b_dT += tl.dot(b_dw.to(DT), tl.trans((b_k * b_bg[:, None]).to(DT)), input_precision=DOT_PRECISION)
        b_dX = tl.dot(tl.trans(b_Tc), b_dw.to(DT), input_precision=DOT_PRECISION)
        b_dkX = b_dX * b_k  # its row sums are the gradient w.r.t. the row scale beta e^gamma
        if USE_G:
            b_dbeta += tl.sum(b_dkX, 1) * tl.exp(b_g)
            b_dg += tl.sum(b_dkX, 1) * b_bg
        else:
            b_dbeta += tl.sum(b_dkX, 1)
        b_dk = tl.load(dk + o_tk, mask=m_tk, other=0.0) + b_dX * b_bg[:, None]
        tl.store(dk + o_tk, b_dk, mask=m_tk)
    # u = T diag(beta) V:  dT += du (beta V)^T,  d(beta V) = T^T du
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        o_tv = o_th[:, None] * V + o_v[None, :]
        b_v = tl.load(v + o_tv, mask=m_tv, other=0.0)
        b_du = tl.load(du + o_tv, mask=m_tv, other=0.0)
        b_dT += tl.dot(b_du.to(DT), tl.trans((b_v * b_beta[:, None]).to(DT)), input_precision=DOT_PRECISION)
        b_dvb = tl.dot(tl.trans(b_Tc), b_du.to(DT), input_precision=DOT_PRECISION)
        b_dbeta += tl.sum(b_dvb * b_v, 1)
        tl.store(dv + o_tv, (b_dvb * b_beta[:, None]).to(dv.dtype.element_ty), mask=m_tv)

    # T = (I + A)^{-1}:  dA = -T^T dT T^T, kept on the strictly lower triangle where A lives
    b_dA = tl.dot(b_dT.to(DT), tl.trans(b_Tc), input_precision=DOT_PRECISION)
    b_dA = tl.dot(tl.trans(b_Tc), b_dA.to(DT), input_precision=DOT_PRECISION)
    b_dA = tl.where(m_A, -b_dA, 0.0)
    if USE_G:
        b_dA *= tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0.0))
    # A_ij = beta_i D_ij (k_i . k_j) with D_ij = e^{gamma_i - gamma_j}; b_dA now holds dA * D
    b_dbeta += tl.sum(b_dA * b_KK, 1)
    b_dA *= b_beta[:, None]
    if USE_G:
        b_dAK = b_dA * b_KK  # dA_ij A_ij: + to gamma_i, - to gamma_j
        b_dg += tl.sum(b_dAK, 1) - tl.sum(b_dAK, 0)
    b_dAc = b_dA.to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        o_tk = o_th[:, None] * K + o_k[None, :]
        b_k = tl.load(k + o_tk, mask=m_tk, other=0.0)
        b_dk = tl.load(dk + o_tk, mask=m_tk, other=0.0)
        b_dk += tl.dot(b_dAc, b_k, input_precision=DOT_PRECISION)
        b_dk += tl.dot(tl.trans(b_dAc), b_k, input_precision=DOT_PRECISION)
        tl.store(dk + o_tk, b_dk, mask=m_tk)
    tl.store(dbeta + o_th, b_dbeta, mask=m_t)
    if USE_G:
        # gamma_i = sum_{j <= i} g_j, so dg_j = sum_{i >= j} dgamma_i (a reverse cumsum inside the chunk)
        b_dg = tl.sum(b_dg, 0) - tl.cumsum(b_dg, axis=0) + b_dg
        tl.store(dg + o_th, b_dg, mask=m_t)


def prepare_wy_repr_fwd(k, v, beta, g, chunk_size, dot_precision):
    """Launch the forward UT transform; returns ``(gc, A, w, u)`` (gc is None without gates)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    gc = torch.empty(B, T, H, device=k.device, dtype=torch.float32) if g is not None else None
    A = torch.empty(B, T, H, BT, device=k.device, dtype=torch.float32)
    w = torch.empty_like(k)
    u = torch.empty_like(v)
    prepare_wy_repr_fwd_kernel[(NT, B * H)](
        k,
        v,
        beta,
        g,
        gc,
        A,
        w,
        u,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=block(K, 64),
        BV=block(V, 64),
        USE_G=g is not None,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
    )
    return gc, A, w, u


def prepare_wy_repr_bwd(k, v, beta, gc, A, dw, du, dk, dgc, chunk_size, dot_precision):
    """Launch the UT-transform backward; adds into ``dk`` (float32) and returns ``(dv, dbeta, dg)``."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BT = chunk_size
    NT = triton.cdiv(T, BT)
    dv = torch.empty(B, T, H, V, device=k.device, dtype=torch.float32)
    dbeta = torch.empty(B, T, H, device=k.device, dtype=torch.float32)
    dg = torch.empty_like(dbeta) if gc is not None else None
    prepare_wy_repr_bwd_kernel[(NT, B * H)](
        k,
        v,
        beta,
        gc,
        A,
        dw,
        du,
        dk,
        dv,
        dbeta,
        dgc,
        dg,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=block(K, 64),
        BV=block(V, 64),
        USE_G=gc is not None,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
    )
    return dv, dbeta, dg
