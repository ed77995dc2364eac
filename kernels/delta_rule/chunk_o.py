"""Triton kernels for the gated delta rule's read-out and the gradients that flow through it.

Forward, per chunk (README, "Chunkwise form"), with h_n the chunk-start state and P = causal(q k^T * D):
    o = scale (e^{gamma} * q) h_n + scale P v_new,      D_ij = e^{gamma_i - gamma_j}
Backward, per chunk, given do, dv_new (total), h_n and dh (the gradient w.r.t. the chunk-end state):
    dq = scale e^{gamma} * (do h_n^T) + dS k,  dS = scale causal(D * (do v_new^T))
    dk = dS^T q + e^{Gamma - gamma} * (v_new dh^T),  dw = -dv_new h_n^T
and the gradient w.r.t. the chunk-local cumsum gamma (row sums of q*dq - k*dk, plus the chunk-end terms on the last
token); the UT-transform kernels (wy_fast.py) add their own shares and turn it into dg.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_rule.tiling import block, num_warps


@triton.jit(do_not_specialize=["T"])
def chunk_fwd_o_kernel(
    q,
    k,
    v_new,
    h,
    gc,
    o,
    scale,
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
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    NT = tl.cdiv(T, BT)

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    # the chunk's first row as a 64-bit scalar; offsets inside the chunk stay 32-bit (fewer registers per tile)
    bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, v_new, o = q + bos * K, k + bos * K, v_new + bos * V, o + bos * V
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    p_h = h + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        o_tk = o_i[:, None] * (H * K) + o_k[None, :]
        b_q = tl.load(q + o_tk, mask=m_tk, other=0.0)
        b_k = tl.load(k + o_tk, mask=m_tk, other=0.0)
        b_h = tl.load(p_h + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=DOT_PRECISION)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION)
    m_A = o_i[:, None] >= o_i[None, :]
    if USE_G:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)
        b_o *= tl.exp(b_g)[:, None]
        b_A *= tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0.0))
    b_A = tl.where(m_A, b_A, 0.0)
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    m_tv = m_t[:, None] & m_v[None, :]
    b_v = tl.load(v_new + o_tv, mask=m_tv, other=0.0)
    b_o = (b_o + tl.dot(b_A.to(DT), b_v, input_precision=DOT_PRECISION)) * scale
    tl.store(o + o_tv, b_o.to(o.dtype.element_ty), mask=m_tv)


@triton.jit(do_not_specialize=["T"])
def chunk_bwd_dqkwg_kernel(
    q,
    k,
    v_new,
    h,
    gc,
    do,
    dh,
    dv,
    dq,
    dk,
    dw,
    dgc,
    scale,
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
    """One program per (K tile, chunk, batch x head); ``dgc`` gets this K tile's share of dgamma ([NK, B, T, H])."""
    i_k, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = q.dtype.element_ty
    NT = tl.cdiv(T, BT)

    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < T
    bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, v_new, do, dv = q + bos * K, k + bos * K, v_new + bos * V, do + bos * V, dv + bos * V
    dq, dk, dw = dq + bos * K, dk + bos * K, dw + bos * K
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_hn = ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # do h^T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # v_new dh^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # dv_new h^T
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # do v_new^T
    b_hdh = tl.zeros([BK], dtype=tl.float32)  # <h_n, dh> over this K tile
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        o_tv = o_i[:, None] * (H * V) + o_v[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_kv = o_hn + o_k[:, None] * V + o_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_vn = tl.load(v_new + o_tv, mask=m_tv, other=0.0)
        b_do = tl.load(do + o_tv, mask=m_tv, other=0.0).to(DT)
        b_dv = tl.load(dv + o_tv, mask=m_tv, other=0.0)
        b_h = tl.load(h + o_kv, mask=m_kv, other=0.0)
        b_dh = tl.load(dh + o_kv, mask=m_kv, other=0.0)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision=DOT_PRECISION)
        b_dk += tl.dot(b_vn, tl.trans(b_dh), input_precision=DOT_PRECISION)
        b_dw += tl.dot(b_dv, tl.trans(b_h), input_precision=DOT_PRECISION)
        b_ds += tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PRECISION)
        if USE_G:
            b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)

    m_tk = m_t[:, None] & m_k[None, :]
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    b_q = tl.load(q + o_tk, mask=m_tk, other=0.0)
    b_k = tl.load(k + o_tk, mask=m_tk, other=0.0)
    m_A = o_i[:, None] >= o_i[None, :]
    if USE_G:
        b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)
        i_last = tl.minimum(BT, T - i_t * BT) - 1  # the chunk's last real token
        b_glast = tl.load(gc + bos + i_last * H)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(b_glast - b_g)[:, None]
        b_ds *= tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], 0.0))
    b_ds = tl.where(m_A, b_ds * scale, 0.0)
    b_dsc = b_ds.to(DT)
    b_dq = b_dq * scale + tl.dot(b_dsc, b_k, input_precision=DOT_PRECISION)
    b_dkp = tl.dot(tl.trans(b_dsc), b_q, input_precision=DOT_PRECISION)
    tl.store(dq + o_tk, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + o_tk, (b_dkp + b_dk).to(dk.dtype.element_ty), mask=m_tk)
    tl.store(dw + o_tk, (-b_dw).to(dw.dtype.element_ty), mask=m_tk)
    if USE_G:
        # gamma enters through e^{gamma} q, D and e^{Gamma - gamma} k; Gamma (the last token's gamma) also through
        # the e^{Gamma} h_n term of the chunk-end state.
        b_kdk = b_k * b_dk
        b_dg = tl.sum(b_q * b_dq, 1) - tl.sum(b_k * b_dkp, 1) - tl.sum(b_kdk, 1)
        b_dglast = tl.sum(b_hdh, 0) * tl.exp(b_glast) + tl.sum(tl.sum(b_kdk, 1), 0)
        b_dg += tl.where(o_i == i_last, b_dglast, 0.0)
        tl.store(dgc + i_k.to(tl.int64) * tl.num_programs(2) * T + bos + o_i * H, b_dg, mask=m_t)


def chunk_fwd_o(q, k, v_new, h, gc, scale, chunk_size, dot_precision):
    """Launch the read-out; returns o in q's dtype."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    BT, BV = chunk_size, block(V, 64)
    o = torch.empty_like(v_new)
    chunk_fwd_o_kernel[(triton.cdiv(V, BV), triton.cdiv(T, BT), B * H)](
        q,
        k,
        v_new,
        h,
        gc,
        o,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=block(K, 64),
        BV=BV,
        USE_G=gc is not None,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
    )
    return o


def chunk_bwd_dqkwg(q, k, v_new, h, gc, do, dh, dv, scale, chunk_size, dot_precision):
    """Launch the read-out backward; returns float32 ``(dq, dk, dw, dgc)`` (dgc summed over K tiles, or None)."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    BT, BK = chunk_size, block(K, 64)
    NK = triton.cdiv(K, BK)
    dq = torch.empty(B, T, H, K, device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dw = torch.empty_like(dq)
    dgc = torch.empty(NK, B, T, H, device=q.device, dtype=torch.float32) if gc is not None else None
    chunk_bwd_dqkwg_kernel[(NK, triton.cdiv(T, BT), B * H)](
        q,
        k,
        v_new,
        h,
        gc,
        do,
        dh,
        dv,
        dq,
        dk,
        dw,
        dgc,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BV=block(V, 64),
        USE_G=gc is not None,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
    )
    return dq, dk, dw, (dgc.sum(0) if dgc is not None else None)
