"""Backward kernels of gated prefix attention (docs/design.md, "The backward").

Two backwards, chosen per call (`deterministic`):

The fused backward (the default), five products per (query block, key block) pair as in
FlashAttention 2 and 3:
1. the prefix kernel (`_dq_kernel` without WORDS), one program per (query block, sequence,
   query head): the row terms delta = rowsum(dO * out), the prefix probabilities P2 and
   dP2 = dO Vp^T, delta2 = rowsum(P2 * dP2) (= rowsum(dO * O2)) and delta1 = delta - a
   delta2, which it stores; the prefix part of dQ into a float32 buffer; the block's
   partial dKp, dVp and gate gradients in the program's own slot.
2. the fused kernel (`_dkdv_kernel` with FUSED_DQ), one program per (key block, sequence, kv
   head), over the query blocks of every query head of the kv group in one flat loop (GQA
   and MQA never repeat k and v): S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q in
   registers, and dQ = dS K added to the float32 buffer, by a bulk reduce-add of the tile
   (TMA) on sm_90, by atomic adds elsewhere. Then dQ is scaled and cast.
The order of those adds varies between runs, so dQ (and what it flows into) may differ in
its last bits. Above head dim 128 the fused kernel's tiles spill: the deterministic
backward runs there.

The deterministic backward, bit-reproducible (every program writes only what it owns;
cross-program sums happen afterwards in PyTorch over per-program partials), seven products
per tile pair:
1. dQ (`_dq_kernel` with WORDS): what the prefix kernel does, then the word part of dQ.
2. dK/dV (`_dkdv_kernel` without FUSED_DQ): the FlashAttention-2 word gradients.
It reads its tiles through pointers only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import (
    DETERMINISTIC_BACKWARD,
    FUSED_BACKWARD,
    FUSED_BACKWARD_MAX_HEAD_DIM,
    autotuner,
    dq_block_m,
    launch,
)
from .forward import (
    load_tile,
    packed_strides,
    read_tile,
    sequence_bounds,
    store_tile,
    tile_source,
    word_key_ranges,
    write_tile,
)
from .utils import (
    INTERPRET,
    LOG2E,
    SIZES_AND_SMALL_STRIDES,
    block_d,
    block_p,
    dot_precision,
    prefix_strides,
    strides,
    t_bucket,
    use_tma,
)


@triton.jit
def _prefix_terms(q, do, lse2, a, pk_src, pv_src, offs_d, d_valid, start_p, P,
                  stride_pkp, stride_pkd, stride_pvp, stride_pvd, scale_log2,
                  EVEN_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """One block of prefix keys: its tiles, the probabilities P2 and dP2 = dO Vp^T."""
    offs_p = start_p + tl.arange(0, BLOCK_P)
    p_valid = offs_p < P
    pk = read_tile(pk_src, 0, start_p, offs_p, stride_pkp, offs_d, stride_pkd, p_valid, d_valid, True, EVEN_D,
                   TMA, BLOCK_P, BLOCK_D)
    pv = read_tile(pv_src, 0, start_p, offs_p, stride_pvp, offs_d, stride_pvd, p_valid, d_valid, True, EVEN_D,
                   TMA, BLOCK_P, BLOCK_D)
    s2 = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION)
    p2 = tl.where(p_valid[None, :], tl.math.exp2(s2 * scale_log2 - lse2[:, None]), 0.0)
    dp2 = tl.dot(do, tl.trans(pv), input_precision=DOT_PRECISION)
    return offs_p, p_valid, pk, p2, dp2


@triton.jit
def _dq_words(
    dq, q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, offs_d, d_valid, lo, hi, T, S,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < S
        k = load_tile(k_base, offs_n, stride_ks, offs_d, stride_kd, n_valid, d_valid, MASKED, EVEN_D)
        v = load_tile(v_base, offs_n, stride_vs, offs_d, stride_vd, n_valid, d_valid, MASKED, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * scale_log2 - lse1[:, None])
        if MASKED or HAS_MASK:
            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (S - T))
            if HAS_MASK:
                key_ok = tl.load(mask_base + offs_n.to(tl.int64) * stride_ms, mask=n_valid, other=0) != 0
                allowed = allowed & key_ok[None, :]
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta1[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=SIZES_AND_SMALL_STRIDES)
def _dq_kernel(
    Q, K, V, PK, PV, A, MASK, CU_Q, CU_K, OUT, DO, LSE1, LSE2, DQ, DELTA1, GATE_PART, DPK_PART, DPV_PART,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ms,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,
    H, BH, T_MAX, S_MAX, P, GROUP, softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    T_BUCKET, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ONE_PREFIX_BLOCK: tl.constexpr,
    WORDS: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program per (query block, sequence, head), heaviest (last) query blocks first.
    # A program that also looped over several query blocks would need far more registers.
    # WORDS: the deterministic backward's dQ kernel (it also runs the word part, and stores dQ
    # scaled in q's dtype). Without: the fused backward's preprocess, which stores the prefix
    # part of dQ, unscaled, into the float32 buffer that the fused kernel then adds to.
    pid = tl.program_id(0)
    bh = pid % BH
    m_block = tl.cdiv(T_MAX, BLOCK_M) - 1 - pid // BH
    start_m = m_block * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    q_start, T, k_start, S = sequence_bounds(CU_Q, CU_K, b, T_MAX, S_MAX, VARLEN)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qt
    do_base = DO + b * stride_dob + h * stride_doh + q_start * stride_dot
    o_base = OUT + b * stride_ob + h * stride_oh + q_start * stride_ot
    pk_src = tile_source(PK + b * stride_pkb + g * stride_pkh, 1, stride_pkp, P, stride_pkp, HEAD_DIM, BLOCK_P,
                         BLOCK_D, TMA)
    pv_src = tile_source(PV + b * stride_pvb + g * stride_pvh, 1, stride_pvp, P, stride_pvp, HEAD_DIM, BLOCK_P,
                         BLOCK_D, TMA)
    lse_base = b * stride_lb + h * stride_lh + q_start
    # This program's slot of the (query blocks, B * H, P, D) float32 prefix-gradient partials
    # and of the (query blocks, B * H) gate partials. A block past the end of a short packed
    # sequence still writes its (zero) partials.
    slot = m_block.to(tl.int64) * BH + bh
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < HEAD_DIM
    q = read_tile(tile_source(q_base, 1, stride_qt, T, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D, TMA), 0, start_m,
                  offs_m, stride_qt, offs_d, stride_qd, m_valid, d_valid, True, EVEN_D, TMA, BLOCK_M, BLOCK_D)
    do = read_tile(tile_source(do_base, 1, stride_dot, T, stride_dot, HEAD_DIM, BLOCK_M, BLOCK_D, TMA), 0, start_m,
                   offs_m, stride_dot, offs_d, stride_dod, m_valid, d_valid, True, EVEN_D, TMA, BLOCK_M, BLOCK_D)
    o = read_tile(tile_source(o_base, 1, stride_ot, T, stride_ot, HEAD_DIM, BLOCK_M, BLOCK_D, TMA), 0, start_m,
                  offs_m, stride_ot, offs_d, stride_od, m_valid, d_valid, True, EVEN_D, TMA, BLOCK_M, BLOCK_D)
    # Rows past T load lse = +inf, so all their probabilities are exactly 0.
    lse1 = tl.load(LSE1 + lse_base + offs_m, mask=m_valid, other=float("inf"))
    lse2 = tl.load(LSE2 + lse_base + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    a = tl.load(A + bh)  # act(gate) of this sequence and head

    # Prefix: delta2 = rowsum(P2 * dP2), dS2 = a * P2 * (dP2 - delta2); dQ starts with dS2 Kp,
    # and this block's dKp = dS2^T Q and dVp = (a P2)^T dO go to its slot.
    part = slot * P * HEAD_DIM
    if ONE_PREFIX_BLOCK:
        offs_p, p_valid, pk, p2, dp2 = _prefix_terms(
            q, do, lse2, a, pk_src, pv_src, offs_d, d_valid, 0, P,
            stride_pkp, stride_pkd, stride_pvp, stride_pvd, scale_log2, EVEN_D, BLOCK_P, BLOCK_D, TMA, DOT_PRECISION)
        delta2 = tl.sum(p2 * dp2, 1)
        ds2 = a * p2 * (dp2 - delta2[:, None])
        dq = tl.dot(ds2.to(pk.dtype), pk, input_precision=DOT_PRECISION)
        _store_prefix_partials(DPK_PART, DPV_PART, part, ds2, a * p2, q, do, offs_p, p_valid, offs_d, d_valid,
                               HEAD_DIM, DOT_PRECISION)
    else:
        delta2 = tl.zeros([BLOCK_M], tl.float32)
        for start_p in range(0, P, BLOCK_P):
            offs_p, p_valid, pk, p2, dp2 = _prefix_terms(
                q, do, lse2, a, pk_src, pv_src, offs_d, d_valid, start_p, P,
                stride_pkp, stride_pkd, stride_pvp, stride_pvd, scale_log2, EVEN_D, BLOCK_P, BLOCK_D, TMA,
                DOT_PRECISION)
            delta2 += tl.sum(p2 * dp2, 1)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_p in range(0, P, BLOCK_P):
            offs_p, p_valid, pk, p2, dp2 = _prefix_terms(
                q, do, lse2, a, pk_src, pv_src, offs_d, d_valid, start_p, P,
                stride_pkp, stride_pkd, stride_pvp, stride_pvd, scale_log2, EVEN_D, BLOCK_P, BLOCK_D, TMA,
                DOT_PRECISION)
            ds2 = a * p2 * (dp2 - delta2[:, None])
            dq = tl.dot(ds2.to(pk.dtype), pk, dq, input_precision=DOT_PRECISION)
            _store_prefix_partials(DPK_PART, DPV_PART, part, ds2, a * p2, q, do, offs_p, p_valid, offs_d, d_valid,
                                   HEAD_DIM, DOT_PRECISION)
    delta1 = delta - a * delta2
    tl.store(DELTA1 + lse_base + offs_m, delta1, mask=m_valid)
    tl.store(GATE_PART + slot, tl.sum(delta2, 0))

    if not WORDS:
        dq_src = tile_source(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqt, 1, stride_dqt, T,
                             stride_dqt, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
        write_tile(dq_src, dq, 0, start_m, offs_m, stride_dqt, offs_d, stride_dqd, m_valid, d_valid, EVEN_D, TMA,
                   BLOCK_M, BLOCK_D)
        return

    # Words, as FlashAttention-2's dQ: unmasked key blocks, then the masked ones.
    full, hi = word_key_ranges(start_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    hi = tl.where(start_m < T, hi, 0)
    full = tl.minimum(full, hi)
    k_base = K + b * stride_kb + g * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + g * stride_vh + k_start * stride_vs
    mask_base = MASK + b * stride_mb
    dq = _dq_words(
        dq, q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, offs_d, d_valid, 0, full, T, S,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
        False, CAUSAL, HAS_MASK, EVEN_D, BLOCK_N, DOT_PRECISION,
    )
    dq = _dq_words(
        dq, q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, offs_d, d_valid, full, hi, T, S,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
        True, CAUSAL, HAS_MASK, EVEN_D, BLOCK_N, DOT_PRECISION,
    )
    store_tile(DQ + b * stride_dqb + h * stride_dqh + q_start * stride_dqt, dq * softmax_scale,
               offs_m, stride_dqt, offs_d, stride_dqd, m_valid, d_valid, EVEN_D)


@triton.jit
def _store_prefix_partials(DPK_PART, DPV_PART, part, ds2, ap2, q, do, offs_p, p_valid, offs_d, d_valid,
                           HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Store one prefix block's dKp = dS2^T Q and dVp = (a P2)^T dO (unscaled, float32)."""
    ptrs = part + offs_p[:, None] * HEAD_DIM + offs_d[None, :]
    pd_valid = p_valid[:, None] & d_valid[None, :]
    tl.store(DPK_PART + ptrs, tl.dot(tl.trans(ds2.to(q.dtype)), q, input_precision=DOT_PRECISION), mask=pd_valid)
    tl.store(DPV_PART + ptrs, tl.dot(tl.trans(ap2.to(do.dtype)), do, input_precision=DOT_PRECISION), mask=pd_valid)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, key_ok, q_src, do_src, dq_dst, head, lse1_ptr, delta1_ptr, offs_n, start_m, offs_d, d_valid,
    stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd, T, S, scale_log2,
    MASK_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, TMA: tl.constexpr, FUSED_DQ: tl.constexpr, DQ_DESC_ADD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block against this program's key block: dV += P^T dO and dK += dS^T Q, and
    with FUSED_DQ the block's dQ = dS K added to the float32 buffer (five products in all)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < T
    q = read_tile(q_src, head, start_m, offs_m, stride_qt, offs_d, stride_qd, m_valid, d_valid, True, EVEN_D,
                  TMA, BLOCK_M, BLOCK_D)
    do = read_tile(do_src, head, start_m, offs_m, stride_dot, offs_d, stride_dod, m_valid, d_valid, True, EVEN_D,
                   TMA, BLOCK_M, BLOCK_D)
    # Rows past T load lse1 = +inf, so their probabilities are exactly 0.
    lse1 = tl.load(lse1_ptr + offs_m, mask=m_valid, other=float("inf"))
    delta1 = tl.load(delta1_ptr + offs_m, mask=m_valid, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
    pt = tl.math.exp2(st * scale_log2 - lse1[None, :])
    if MASK_CAUSAL:
        pt = tl.where(offs_n[:, None] <= offs_m[None, :] + (S - T), pt, 0.0)
    if HAS_MASK:
        pt = tl.where(key_ok[:, None], pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = (pt * (dpt - delta1[None, :])).to(q.dtype)
    dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
    if FUSED_DQ:
        # Keys past S are zero rows of k (masked loads, or the copy engine's fill), so they
        # add nothing here although their dS is not masked.
        dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_D)
        if DQ_DESC_ADD:  # one bulk reduce-add of the tile (rows past T are clipped)
            dq_dst.atomic_add([head, start_m, 0], dq.reshape(1, BLOCK_M, BLOCK_D))
        else:
            ptrs = dq_dst + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :] * stride_dqd
            tl.atomic_add(ptrs, dq, mask=m_valid[:, None] & d_valid[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=SIZES_AND_SMALL_STRIDES)
def _dkdv_kernel(
    Q, K, V, MASK, CU_Q, CU_K, DO, LSE1, DELTA1, DQ, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    stride_lb, stride_lh,
    HKV, BG, T_MAX, S_MAX, GROUP, softmax_scale, scale_log2,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    T_BUCKET, BLOCK_D: tl.constexpr, FUSED_DQ: tl.constexpr, TMA: tl.constexpr, DQ_DESC_ADD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # (sequence, kv head) fastest; key blocks first to last: under causal masking the first
    # key blocks are seen by the most queries, so the heaviest programs start first.
    # FUSED_DQ: the fused backward (dQ added to a float32 buffer by atomics); without, the
    # deterministic backward's dK/dV kernel (its dQ kernel ran first).
    pid = tl.program_id(0)
    bg = pid % BG
    start_n = (pid // BG) * BLOCK_N
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)
    q_start, T, k_start, S = sequence_bounds(CU_Q, CU_K, b, T_MAX, S_MAX, VARLEN)
    if start_n >= S:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S
    d_valid = offs_d < HEAD_DIM
    k_base = K + b * stride_kb + g * stride_kh + k_start * stride_ks
    v_base = V + b * stride_vb + g * stride_vh + k_start * stride_vs
    k = read_tile(tile_source(k_base, 1, stride_ks, S, stride_ks, HEAD_DIM, BLOCK_N, BLOCK_D, TMA), 0, start_n,
                  offs_n, stride_ks, offs_d, stride_kd, n_valid, d_valid, True, EVEN_D, TMA, BLOCK_N, BLOCK_D)
    v = read_tile(tile_source(v_base, 1, stride_vs, S, stride_vs, HEAD_DIM, BLOCK_N, BLOCK_D, TMA), 0, start_n,
                  offs_n, stride_vs, offs_d, stride_vd, n_valid, d_valid, True, EVEN_D, TMA, BLOCK_N, BLOCK_D)
    key_ok = n_valid
    if HAS_MASK:
        key_ok = tl.load(MASK + b * stride_mb + offs_n.to(tl.int64) * stride_ms, mask=n_valid, other=0) != 0

    if CAUSAL:
        # Query t sees key j iff j <= t + S - T. Rows from `lo` may see some key of this
        # block; rows from `mid` see all of them (no causal comparison needed).
        shift = S - T
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - shift + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), tl.maximum(T, lo))
    else:
        lo = 0
        mid = 0
    n_diag = tl.cdiv(mid - lo, BLOCK_M)
    n_full = tl.cdiv(T - mid, BLOCK_M)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # One flat loop over (query head of the group, query block): a nested loop would keep
    # the pipelining state of the inner loop alive across the outer one. The sequence's bases
    # are computed once, outside the loops: only the head changes inside. With TMA, one
    # descriptor per tensor covers the group's query heads (the head is its first index).
    q_seq = Q + b * stride_qb + q_start * stride_qt
    do_seq = DO + b * stride_dob + q_start * stride_dot
    dq_seq = DQ + b * stride_dqb + q_start * stride_dqt
    lse_seq = LSE1 + b * stride_lb + q_start
    delta_seq = DELTA1 + b * stride_lb + q_start
    q_group = tile_source(q_seq + g * GROUP * stride_qh, GROUP, stride_qh, T, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D,
                          TMA)
    do_group = tile_source(do_seq + g * GROUP * stride_doh, GROUP, stride_doh, T, stride_dot, HEAD_DIM, BLOCK_M,
                           BLOCK_D, TMA)
    dq_group = tile_source(dq_seq + g * GROUP * stride_dqh, GROUP, stride_dqh, T, stride_dqt, HEAD_DIM, BLOCK_M,
                           BLOCK_D, DQ_DESC_ADD)
    for i in range(0, GROUP * n_diag):
        hh = i // n_diag
        h = g * GROUP + hh
        dk, dv = _dkdv_step(
            dk, dv, k, v, key_ok,
            q_group if TMA else q_seq + h * stride_qh, do_group if TMA else do_seq + h * stride_doh,
            dq_group if DQ_DESC_ADD else dq_seq + h * stride_dqh, hh,
            lse_seq + h * stride_lh, delta_seq + h * stride_lh,
            offs_n, lo + (i - hh * n_diag) * BLOCK_M, offs_d, d_valid,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd, T, S, scale_log2,
            CAUSAL, HAS_MASK, EVEN_D, BLOCK_M, BLOCK_D, TMA, FUSED_DQ, DQ_DESC_ADD, DOT_PRECISION,
        )
    for i in range(0, GROUP * n_full):
        hh = i // n_full
        h = g * GROUP + hh
        dk, dv = _dkdv_step(
            dk, dv, k, v, key_ok,
            q_group if TMA else q_seq + h * stride_qh, do_group if TMA else do_seq + h * stride_doh,
            dq_group if DQ_DESC_ADD else dq_seq + h * stride_dqh, hh,
            lse_seq + h * stride_lh, delta_seq + h * stride_lh,
            offs_n, mid + (i - hh * n_full) * BLOCK_M, offs_d, d_valid,
            stride_qt, stride_qd, stride_dot, stride_dod, stride_dqt, stride_dqd, T, S, scale_log2,
            False, HAS_MASK, EVEN_D, BLOCK_M, BLOCK_D, TMA, FUSED_DQ, DQ_DESC_ADD, DOT_PRECISION,
        )

    dk_base = DK + b * stride_dkb + g * stride_dkh + k_start * stride_dks
    dv_base = DV + b * stride_dvb + g * stride_dvh + k_start * stride_dvs
    write_tile(tile_source(dk_base, 1, stride_dks, S, stride_dks, HEAD_DIM, BLOCK_N, BLOCK_D, TMA),
               (dk * softmax_scale).to(DK.dtype.element_ty), 0, start_n, offs_n, stride_dks, offs_d, stride_dkd,
               n_valid, d_valid, EVEN_D, TMA, BLOCK_N, BLOCK_D)
    write_tile(tile_source(dv_base, 1, stride_dvs, S, stride_dvs, HEAD_DIM, BLOCK_N, BLOCK_D, TMA),
               dv.to(DV.dtype.element_ty), 0, start_n, offs_n, stride_dvs, offs_d, stride_dvd,
               n_valid, d_valid, EVEN_D, TMA, BLOCK_N, BLOCK_D)


_dq_kernel_tuned = autotuner("backward_dq", _dq_kernel)
_dkdv_kernel_tuned = autotuner("backward_dkdv", _dkdv_kernel)
_prefix_kernel_tuned = autotuner("backward_prefix", _dq_kernel)
_fused_kernel_tuned = autotuner("backward", _dkdv_kernel)


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse1: torch.Tensor,
    lse2: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernels on a padded batch and reduce their partials.

    deterministic: the two-kernel backward without atomics (bit-reproducible); else the
    fused one, whose dQ is summed with atomic adds in float32.
    Returns (dq, dk, dv, dprefix_k, dprefix_v, dgate_act), each shaped like its input;
    dgate_act is float32 of shape (B * Hq,), one per sequence and query head.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    dev = q.device
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=dev)
    # The dK/dV kernel writes every row when there are keys.
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=dev)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=dev)
    if B == 0 or T == 0:
        return (dq, dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v),
                torch.zeros_like(gate_act))
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    do = do.to(q.dtype)
    delta1 = torch.empty_like(lse1)
    dpk, dpv, dgate = launch_backward(
        do, q, k, v, prefix_k, prefix_v, gate_act, mask, None, None, out, lse1, lse2, delta1, dq, dk, dv,
        q.stride(), k.stride(), v.stride(), out.stride(), do.stride(), dk.stride(), dv.stride(),
        lse1.stride()[:2], B, H, Hkv, T, S, causal, softmax_scale, deterministic,
    )
    return dq, dk, dv, dpk, dpv, dgate


def varlen_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor,
    lse1: torch.Tensor,
    lse2: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    deterministic: bool = False,
) -> tuple[torch.Tensor, ...]:
    """The backward of `varlen_forward`: gradients of q, k, v, prefix_k, prefix_v (each
    shaped like its input) and of gate_act ((n_seqs * Hq,) float32); `deterministic` as for
    `backward`."""
    total_q, H, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    n_seqs = cu_seqlens_q.numel() - 1
    dev = q.device
    dq = torch.empty((total_q, H, D), dtype=q.dtype, device=dev)
    # Every key row belongs to a sequence, so the dK/dV kernel writes them all.
    dk = torch.empty((total_k, Hkv, D), dtype=k.dtype, device=dev)
    dv = torch.empty((total_k, Hkv, D), dtype=v.dtype, device=dev)
    if total_q == 0 or n_seqs == 0:
        return (dq, dk.zero_(), dv.zero_(), torch.zeros_like(prefix_k), torch.zeros_like(prefix_v),
                torch.zeros_like(gate_act))
    do = do.to(q.dtype)
    delta1 = torch.empty_like(lse1)
    dpk, dpv, dgate = launch_backward(
        # The kernels read cu_seqlens with stride 1.
        do, q, k, v, prefix_k, prefix_v, gate_act, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
        out, lse1, lse2, delta1,
        dq, dk, dv, *(packed_strides(x) for x in (q, k, v, out, do, dk, dv)), (0, lse1.stride(0)),
        n_seqs, H, Hkv, max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic,
    )
    return dq, dk, dv, dpk, dpv, dgate


def launch_backward(do, q, k, v, prefix_k, prefix_v, gate_act, mask, cu_q, cu_k, out, lse1, lse2, delta1,
                    dq, dk, dv, q_strides, k_strides, v_strides, out_strides, do_strides,
                    dk_strides, dv_strides, lse_strides, n_seqs, H, Hkv, T_max, S_max, causal, softmax_scale,
                    deterministic):
    """Shared by the padded and the packed launcher (strides are (b, h, t, d), b stride 0
    when packed; dq is laid out as q is allocated, (B, H, T, D) or (total, H, D), contiguous).
    Writes dq, dk, dv, delta1; returns dprefix_k, dprefix_v, dgate_act.

    Deterministic (and at head dims above FUSED_BACKWARD_MAX_HEAD_DIM, where the fused
    kernel's tiles spill): the dQ kernel (row terms, prefix, word dQ) then the dK/dV kernel.
    Fused: the prefix kernel (row terms, prefix, the prefix's dQ into a float32 buffer), then
    the fused kernel (dK, dV, and dQ added to the buffer), then dQ's scale and cast."""
    D = q.shape[-1]
    P = prefix_k.shape[-2]
    group = H // Hkv
    dev = q.device
    bp = block_p(P)
    scale_log2 = softmax_scale * LOG2E
    deterministic = deterministic or D > FUSED_BACKWARD_MAX_HEAD_DIM
    meta = dict(HEAD_DIM=D, CAUSAL=causal, HAS_MASK=mask is not None, VARLEN=cu_q is not None,
                T_BUCKET=t_bucket(T_max), BLOCK_D=block_d(D), DOT_PRECISION=dot_precision(q.dtype))
    mask_arg = mask if mask is not None else q
    cu_q_arg = cu_q if cu_q is not None else gate_act
    cu_k_arg = cu_k if cu_k is not None else gate_act
    packed = cu_q is not None
    # The fused path's dQ accumulates in float32 (its atomic adds and TMA reduce-adds).
    dq_acc = dq if deterministic else torch.empty(dq.shape, dtype=torch.float32, device=dev)
    dq_strides = packed_strides(dq_acc) if packed else dq_acc.stride()
    # The backward's two kernels: the one per query block, then the one per key block.
    first, keyed = DETERMINISTIC_BACKWARD if deterministic else FUSED_BACKWARD

    # 1. Row terms, prefix and gate partials (and dQ or its prefix part), one slot per
    # program: every candidate of the kernel has the same BLOCK_M, so the slots come first.
    bh = n_seqs * H
    n_blocks = triton.cdiv(T_max, dq_block_m(D, q.element_size(), first))
    dpk_part = torch.empty((n_blocks, n_seqs, H, P, D), dtype=torch.float32, device=dev)
    dpv_part = torch.empty_like(dpk_part)
    gate_part = torch.empty((n_blocks, n_seqs, H), dtype=torch.float32, device=dev)
    args = (
        q, k, v, prefix_k, prefix_v, gate_act, mask_arg, cu_q_arg, cu_k_arg, out, do, lse1, lse2, dq_acc, delta1,
        gate_part, dpk_part, dpv_part,
        *q_strides, *k_strides, *v_strides, *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *strides(mask, 2), *out_strides, *do_strides, *dq_strides, *lse_strides,
        H, bh, T_max, S_max, P, group, softmax_scale, scale_log2,
    )
    tma = not deterministic and use_tma(q, do, out, prefix_k, prefix_v, dq_acc)
    launch(first, _dq_kernel, _dq_kernel_tuned if deterministic else _prefix_kernel_tuned,
           lambda cfg: (n_blocks * bh,), args,
           dict(meta, BLOCK_P=bp, ONE_PREFIX_BLOCK=P <= bp, WORDS=deterministic, TMA=tma))

    # 2. dK, dV (and the word part of dQ when fused)
    if S_max > 0:
        bg = n_seqs * Hkv
        args = (
            q, k, v, mask_arg, cu_q_arg, cu_k_arg, do, lse1, delta1, dq_acc, dk, dv,
            *q_strides, *k_strides, *v_strides, *strides(mask, 2), *do_strides, *dq_strides, *dk_strides,
            *dv_strides, *lse_strides, Hkv, bg, T_max, S_max, group, softmax_scale, scale_log2,
        )
        tma = not deterministic and use_tma(q, k, v, do, dq_acc, dk, dv)
        # Triton's interpreter has no bulk reduce-add: there the atomic adds take pointers.
        fused = dict(FUSED_DQ=not deterministic, TMA=tma, DQ_DESC_ADD=tma and not INTERPRET)
        launch(keyed, _dkdv_kernel, _dkdv_kernel_tuned if deterministic else _fused_kernel_tuned,
               lambda cfg: (triton.cdiv(S_max, cfg["BLOCK_N"]) * bg,), args, dict(meta, **fused))
    if not deterministic:
        dq.copy_(dq_acc.mul_(softmax_scale))

    # Sum the partials over query blocks and over the query heads of each kv group, then over the
    # sequences when the prefix is shared.
    def reduce(part: torch.Tensor, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        grad = part.sum(0).view(n_seqs, Hkv, group, P, D).sum(2)
        if like.dim() == 3:
            grad = grad.sum(0)
        return (grad * scale).to(like.dtype)

    dgate = gate_part.sum(0).reshape(-1)  # one per sequence and head, as gate_act
    return reduce(dpk_part, prefix_k, softmax_scale), reduce(dpv_part, prefix_v), dgate


__all__ = ["backward", "varlen_backward", "launch_backward"]
