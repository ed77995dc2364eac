"""Triton kernels for the one sequential part of the chunked gated delta rule: the state carried across chunks.

Forward, chunk n with start state h_n [K, V] (README, "Chunkwise form"):
    v_new = u - w h_n                                   (the chunk's effective values, delta_n)
    h_{n+1} = e^{Gamma} h_n + (e^{Gamma - gamma} * k)^T v_new
Backward, from the last chunk to the first, with dh the gradient w.r.t. the state at the chunk's end:
    dv_new = P^T do + (e^{Gamma - gamma} * k) dh       (P: the chunk's causal, decayed, scaled q k^T)
    dh <- e^{Gamma} dh + scale (e^{gamma} * q)^T do - w^T dv_new
One program per (V tile, batch x head) walks the chunks in order and keeps its [K, BV] slice of the state in float32
registers; K is one tile (K <= 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.delta_rule.tiling import block, num_warps, state_block


@triton.jit(do_not_specialize=["T"])
def chunk_gated_delta_rule_fwd_h_kernel(
    k,
    w,
    u,
    gc,
    h0,
    h,
    v_new,
    ht,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = k.dtype.element_ty
    NT = tl.cdiv(T, BT)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    # 32-bit offsets inside a chunk (token i of the chunk is row i * H); 64-bit scalars locate the chunk
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_bh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(NT):
        m_t = i_t * BT + o_i < T
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
        tl.store(h + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)

        b_w = tl.load(w + bos * K + o_tk, mask=m_tk, other=0.0)
        b_u = tl.load(u + bos * V + o_tv, mask=m_tv, other=0.0)
        b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_h.to(DT), input_precision=DOT_PRECISION)
        tl.store(v_new + bos * V + o_tv, b_vn.to(v_new.dtype.element_ty), mask=m_tv)

        b_k = tl.load(k + bos * K + o_tk, mask=m_tk, other=0.0)
        if USE_G:  # the decay to the chunk's end goes on the [BT, BV] values rather than on the [BT, K] keys
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)
            b_glast = tl.load(gc + bos + (tl.minimum(BT, T - i_t * BT) - 1) * H)
            b_h *= tl.exp(b_glast)
            b_vn *= tl.exp(b_glast - b_g)[:, None]
        b_h += tl.dot(tl.trans(b_k), b_vn.to(DT), input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(ht + i_bh.to(tl.int64) * K * V + o_kv, b_h, mask=m_kv)


@triton.jit(do_not_specialize=["T"])
def chunk_gated_delta_rule_bwd_dhu_kernel(
    q,
    k,
    w,
    gc,
    do,
    dht,
    dh0,
    dh,
    dv,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_G: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = k.dtype.element_ty
    NT = tl.cdiv(T, BT)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    o_tk = o_i[:, None] * (H * K) + o_k[None, :]
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    m_P = o_i[:, None] <= o_i[None, :]  # P^T[s, r] is nonzero for s <= r
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_bh.to(tl.int64) * K * V + o_kv, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(NT - 1, -1, -1):
        m_t = i_t * BT + o_i < T
        bos = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
        # dh[n] is the gradient w.r.t. the state at the end of chunk n (what chunk n wrote into)
        tl.store(dh + ((i_b * NT + i_t) * H + i_h).to(tl.int64) * K * V + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)

        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + bos * K + o_tk, mask=m_tk, other=0.0)
        b_k = tl.load(k + bos * K + o_tk, mask=m_tk, other=0.0)
        b_do = tl.load(do + bos * V + o_tv, mask=m_tv, other=0.0)

        # The row scales (decays, scale) go on the [BT, BV] factors rather than on the wider [BT, K] q and k.
        b_Pt = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION)  # [s, r] = k_s . q_r
        b_kdh = tl.dot(b_k, b_dh.to(DT), input_precision=DOT_PRECISION)
        b_dos = b_do.to(tl.float32) * scale
        if USE_G:
            b_g = tl.load(gc + bos + o_i * H, mask=m_t, other=0.0)
            b_glast = tl.load(gc + bos + (tl.minimum(BT, T - i_t * BT) - 1) * H)
            b_Pt *= tl.exp(tl.where(m_P, b_g[None, :] - b_g[:, None], 0.0))
            b_kdh *= tl.exp(b_glast - b_g)[:, None]
            b_dos *= tl.exp(b_g)[:, None]
        b_Pt = tl.where(m_P, b_Pt * scale, 0.0)
        b_dv = tl.dot(b_Pt.to(DT), b_do.to(DT), input_precision=DOT_PRECISION) + b_kdh
        tl.store(dv + bos * V + o_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)

        b_w = tl.load(w + bos * K + o_tk, mask=m_tk, other=0.0)
        if USE_G:
            b_dh *= tl.exp(b_glast)
        b_dh += tl.dot(tl.trans(b_q), b_dos.to(DT), input_precision=DOT_PRECISION)
        b_dh -= tl.dot(tl.trans(b_w), b_dv.to(DT), input_precision=DOT_PRECISION)

    if USE_INITIAL_STATE:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + o_kv, b_dh, mask=m_kv)


def chunk_gated_delta_rule_fwd_h(k, w, u, gc, initial_state, output_final_state, chunk_size, dot_precision):
    """Launch the forward state pass; returns ``(h, v_new, final_state)`` with h [B, NT, H, K, V] chunk-start states."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    BT, BV = chunk_size, block(V, 32)
    NT = triton.cdiv(T, BT)
    h = k.new_empty(B, NT, H, K, V)
    v_new = torch.empty_like(u)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32) if output_final_state else None
    chunk_gated_delta_rule_fwd_h_kernel[(triton.cdiv(V, BV), B * H)](
        k,
        w,
        u,
        gc,
        initial_state,
        h,
        v_new,
        ht,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=state_block(K),
        BV=BV,
        USE_G=gc is not None,
        USE_INITIAL_STATE=initial_state is not None,
        STORE_FINAL_STATE=output_final_state,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
        num_stages=1,
    )
    return h, v_new, ht


def chunk_gated_delta_rule_bwd_dhu(q, k, w, gc, do, dht, has_initial_state, scale, chunk_size, dot_precision):
    """Launch the backward state pass; returns ``(dh, dv_new, dh0)``: dh [B, NT, H, K, V] per chunk end, the total
    gradient of the chunk values v_new, and the initial-state gradient (float32) or None."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    BT, BV = chunk_size, block(V, 32)
    NT = triton.cdiv(T, BT)
    dh = q.new_empty(B, NT, H, K, V)
    dv = torch.empty_like(do, dtype=q.dtype)
    dh0 = q.new_empty(B, H, K, V, dtype=torch.float32) if has_initial_state else None
    chunk_gated_delta_rule_bwd_dhu_kernel[(triton.cdiv(V, BV), B * H)](
        q,
        k,
        w,
        gc,
        do,
        dht,
        dh0,
        dh,
        dv,
        scale,
        T,
        H=H,
        K=K,
        V=V,
        BT=BT,
        BK=state_block(K),
        BV=BV,
        USE_G=gc is not None,
        USE_INITIAL_STATE=has_initial_state,
        USE_FINAL_STATE_GRADIENT=dht is not None,
        DOT_PRECISION=dot_precision,
        num_warps=num_warps(BT),
        num_stages=2,
    )
    return dh, dv, dh0
