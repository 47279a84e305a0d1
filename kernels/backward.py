"""Backward kernels of gated prefix attention (DESIGN.md section 4).

Three launches, all deterministic (every program writes only what it owns; cross-program
sums happen afterwards in PyTorch over per-program partials):

1. preprocess, one program per (query block, b, h): delta = rowsum(dO * out), recompute the
   prefix output O2 (P is small), delta2 = rowsum(dO * O2), delta1 = delta - a * delta2,
   and the block's partial sum of delta2 (the gate's gradient).
2. dK/dV, one program per (key block, b, kv head): the FlashAttention-2 word gradients,
   looping over the query heads of the kv group, so GQA and MQA never repeat k and v.
3. dQ, one program per (split, b, h), each looping over the query blocks
   split, split + N_SPLITS, ...: the word and prefix parts of dQ, and partial prefix
   gradients dKp, dVp of those blocks, accumulated in the program's own fp32 slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import LOG2E, prefix_strides, strides
from .utils import (
    AUTOTUNE,
    DKDV_CONFIGS,
    DQ_CONFIGS,
    INTERPRET,
    block_d,
    block_p,
    count_launch,
    dot_precision,
    fixed_blocks,
    make_configs,
    num_sms,
    prune_by_shared_memory,
    t_bucket,
)


@triton.jit
def _preprocess_kernel(
    Q, PK, PV, A, OUT, DO, LSE2, DELTA1, DELTA2, GATE_PARTIAL,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T, P, D, GROUP, scale_log2, N_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    md_valid = m_valid[:, None] & (offs_d < D)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qt + offs_d[None, :] * stride_qd,
                mask=md_valid, other=0.0)
    o = tl.load(OUT + b * stride_ob + h * stride_oh + rows * stride_ot + offs_d[None, :] * stride_od,
                mask=md_valid, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dot + offs_d[None, :] * stride_dod,
                 mask=md_valid, other=0.0)
    row = pid_bh.to(tl.int64) * T + offs_m
    lse2 = tl.load(LSE2 + row, mask=m_valid, other=float("inf"))

    pk_base = PK + b * stride_pkb + g * stride_pkh
    pv_base = PV + b * stride_pvb + g * stride_pvh
    o2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_p in range(0, P, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        pkt = tl.load(pk_base + offs_p[None, :] * stride_pkp + offs_d[:, None] * stride_pkd,
                      mask=p_valid[None, :] & (offs_d < D)[:, None], other=0.0)
        pv = tl.load(pv_base + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                     mask=p_valid[:, None] & (offs_d < D)[None, :], other=0.0)
        s2 = tl.dot(q, pkt, input_precision=DOT_PRECISION) * scale_log2
        p2 = tl.where(p_valid[None, :], tl.math.exp2(s2 - lse2[:, None]), 0.0)
        o2 += tl.dot(p2.to(pv.dtype), pv, input_precision=DOT_PRECISION)

    do = do.to(tl.float32)
    a = tl.load(A + h)
    delta2 = tl.sum(do * o2, 1)
    delta1 = tl.sum(do * o, 1) - a * delta2
    tl.store(DELTA1 + row, delta1, mask=m_valid)
    tl.store(DELTA2 + row, delta2, mask=m_valid)
    tl.store(GATE_PARTIAL + pid_bh.to(tl.int64) * N_BLOCKS + pid_m, tl.sum(delta2, 0))


@triton.jit
def _dkdv_block(
    k, v, key_ok, q_base, do_base, lse1_base, delta1_base, offs_n, start_m, offs_d, d_valid,
    stride_qt, stride_qd, stride_dot, stride_dod,
    dk, dv, T, causal_shift, scale_log2,
    CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_valid = offs_m < T
    rows = offs_m[:, None].to(tl.int64)
    md_valid = m_valid[:, None] & d_valid[None, :]
    q = tl.load(q_base + rows * stride_qt + offs_d[None, :] * stride_qd, mask=md_valid, other=0.0)
    do = tl.load(do_base + rows * stride_dot + offs_d[None, :] * stride_dod, mask=md_valid, other=0.0)
    # Rows past T load lse1 = +inf, so their probabilities are exactly 0.
    lse1 = tl.load(lse1_base + offs_m, mask=m_valid, other=float("inf"))
    delta1 = tl.load(delta1_base + offs_m, mask=m_valid, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_N, BLOCK_M)
    pt = tl.math.exp2(st - lse1[None, :])
    if CAUSAL_MASK:
        pt = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_shift, pt, 0.0)
    if HAS_MASK:
        pt = tl.where(key_ok[:, None], pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta1[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, MASK, DO, LSE1, DELTA1, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    H, HKV, T, S, D, GROUP, softmax_scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, T_BUCKET,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // HKV).to(tl.int64)
    g = (pid_bg % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < S
    d_valid = offs_d < D
    nd_valid = n_valid[:, None] & d_valid[None, :]
    cols = offs_n[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + g * stride_kh + cols * stride_ks + offs_d[None, :] * stride_kd,
                mask=nd_valid, other=0.0)
    v = tl.load(V + b * stride_vb + g * stride_vh + cols * stride_vs + offs_d[None, :] * stride_vd,
                mask=nd_valid, other=0.0)
    key_ok = n_valid
    if HAS_MASK:
        key_ok = tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_valid, other=0) != 0

    causal_shift = S - T
    if CAUSAL:
        # Query t sees key j iff j <= t + S - T. Rows from `lo` may see some key of this
        # block; rows from `mid` see all of them (no causal comparison needed).
        lo = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
        first_full_row = start_n + BLOCK_N - 1 - causal_shift
        mid = tl.maximum(first_full_row + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), tl.maximum(T, lo))
    else:
        lo = 0
        mid = 0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for hh in range(0, GROUP):
        h = g * GROUP + hh
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row0 = (b * H + h) * T
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_block(
                k, v, key_ok, q_base, do_base, LSE1 + row0, DELTA1 + row0, offs_n, start_m,
                offs_d, d_valid, stride_qt, stride_qd, stride_dot, stride_dod,
                dk, dv, T, causal_shift, scale_log2,
                CAUSAL, HAS_MASK, BLOCK_M, DOT_PRECISION,
            )
        for start_m in range(mid, T, BLOCK_M):
            dk, dv = _dkdv_block(
                k, v, key_ok, q_base, do_base, LSE1 + row0, DELTA1 + row0, offs_n, start_m,
                offs_d, d_valid, stride_qt, stride_qd, stride_dot, stride_dod,
                dk, dv, T, causal_shift, scale_log2,
                False, HAS_MASK, BLOCK_M, DOT_PRECISION,
            )

    dk = dk * softmax_scale
    tl.store(DK + b * stride_dkb + g * stride_dkh + cols * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=nd_valid)
    tl.store(DV + b * stride_dvb + g * stride_dvh + cols * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=nd_valid)


@triton.jit
def _dq_word_block(
    q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
    dq, S, causal_shift, scale_log2,
    CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < S
    nd_valid = n_valid[:, None] & d_valid[None, :]
    cols = offs_n[:, None].to(tl.int64)
    k = tl.load(k_base + cols * stride_ks + offs_d[None, :] * stride_kd, mask=nd_valid, other=0.0)
    v = tl.load(v_base + cols * stride_vs + offs_d[None, :] * stride_vd, mask=nd_valid, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    p = tl.math.exp2(s - lse1[:, None])
    allowed = n_valid[None, :]
    if CAUSAL_MASK:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    if HAS_MASK:
        key_ok = tl.load(mask_base + offs_n * stride_ms, mask=n_valid, other=0) != 0
        allowed = allowed & key_ok[None, :]
    p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta1[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, PK, PV, A, MASK, DO, LSE1, LSE2, DELTA1, DELTA2, DQ, DPK_PART, DPV_PART,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ms,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, S, P, D, GROUP, N_SPLITS, softmax_scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, T_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    pk_base = PK + b * stride_pkb + g * stride_pkh
    pv_base = PV + b * stride_pvb + g * stride_pvh
    mask_base = MASK + b * stride_mb
    # This program's slot of the (N_SPLITS, B * H, P, D) fp32 prefix-gradient partials.
    part = (split.to(tl.int64) * tl.num_programs(1) + pid_bh) * P * D
    a = tl.load(A + h)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < D
    causal_shift = S - T

    for start_m in range(split * BLOCK_M, T, N_SPLITS * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < T
        rows = offs_m[:, None].to(tl.int64)
        md_valid = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + rows * stride_qt + offs_d[None, :] * stride_qd, mask=md_valid, other=0.0)
        do = tl.load(do_base + rows * stride_dot + offs_d[None, :] * stride_dod, mask=md_valid, other=0.0)
        row = pid_bh.to(tl.int64) * T + offs_m
        lse1 = tl.load(LSE1 + row, mask=m_valid, other=float("inf"))
        lse2 = tl.load(LSE2 + row, mask=m_valid, other=float("inf"))
        delta1 = tl.load(DELTA1 + row, mask=m_valid, other=0.0)
        delta2 = tl.load(DELTA2 + row, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        if CAUSAL:
            hi = tl.minimum(S, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
            full = tl.maximum(start_m + causal_shift + 1, 0) // BLOCK_N * BLOCK_N
            full = tl.minimum(full, S // BLOCK_N * BLOCK_N)
        else:
            hi = S
            full = S // BLOCK_N * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            dq = _dq_word_block(
                q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
                stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
                dq, S, causal_shift, scale_log2,
                False, HAS_MASK, BLOCK_N, DOT_PRECISION,
            )
        for start_n in range(full, hi, BLOCK_N):
            dq = _dq_word_block(
                q, do, lse1, delta1, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
                stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
                dq, S, causal_shift, scale_log2,
                CAUSAL, HAS_MASK, BLOCK_N, DOT_PRECISION,
            )

        # Prefix: dS2 = a * P2 * (dO Vp^T - delta2).
        for start_p in range(0, P, BLOCK_P):
            offs_p = start_p + tl.arange(0, BLOCK_P)
            p_valid = offs_p < P
            pd_valid = p_valid[:, None] & d_valid[None, :]
            pk = tl.load(pk_base + offs_p[:, None] * stride_pkp + offs_d[None, :] * stride_pkd,
                         mask=pd_valid, other=0.0)
            pv = tl.load(pv_base + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
                         mask=pd_valid, other=0.0)
            s2 = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION) * scale_log2
            p2 = tl.where(p_valid[None, :], tl.math.exp2(s2 - lse2[:, None]), 0.0)
            dp2 = tl.dot(do, tl.trans(pv), input_precision=DOT_PRECISION)
            ds2 = a * p2 * (dp2 - delta2[:, None])
            dq += tl.dot(ds2.to(pk.dtype), pk, input_precision=DOT_PRECISION)
            dpk = tl.dot(tl.trans(ds2).to(q.dtype), q, input_precision=DOT_PRECISION)
            dpv = tl.dot(tl.trans(a * p2).to(do.dtype), do, input_precision=DOT_PRECISION)
            slot = part + offs_p[:, None] * D + offs_d[None, :]
            # Read-modify-write of memory only this program touches; the barrier orders this
            # block's loads after the previous block's stores across the program's threads.
            tl.debug_barrier()
            tl.store(DPK_PART + slot, tl.load(DPK_PART + slot, mask=pd_valid, other=0.0) + dpk,
                     mask=pd_valid)
            tl.store(DPV_PART + slot, tl.load(DPV_PART + slot, mask=pd_valid, other=0.0) + dpv,
                     mask=pd_valid)

        dq = dq * softmax_scale
        tl.store(dq_base + rows * stride_dqt + offs_d[None, :] * stride_dqd,
                 dq.to(DQ.dtype.element_ty), mask=md_valid)


_dkdv_kernel_tuned = (
    triton.autotune(
        configs=make_configs(DKDV_CONFIGS),
        key=["BLOCK_D", "CAUSAL", "HAS_MASK", "T_BUCKET", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_by_shared_memory},
    )(_dkdv_kernel)
    if AUTOTUNE
    else None
)
_dq_kernel_tuned = (
    triton.autotune(
        configs=make_configs(DQ_CONFIGS),
        key=["BLOCK_D", "CAUSAL", "HAS_MASK", "T_BUCKET", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_by_shared_memory},
        # The partial prefix gradients are accumulated: start each tuning run from zero.
        reset_to_zero=["DPK_PART", "DPV_PART"],
    )(_dq_kernel)
    if AUTOTUNE
    else None
)

PREPROCESS_BLOCK_M = 16 if INTERPRET else 64


def _num_splits(batch_heads: int, T: int, device: torch.device) -> int:
    """Programs per (b, h) for the dQ kernel: enough to fill the GPU, at most one per block."""
    if device.type != "cuda":
        return min(2, triton.cdiv(T, 16))
    target = 4 * num_sms(device.index or 0)
    return max(1, min(triton.cdiv(target, batch_heads), triton.cdiv(T, 64)))


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
) -> tuple[torch.Tensor, ...]:
    """Launch the three backward kernels and reduce their partials.

    Returns (dq, dk, dv, dprefix_k, dprefix_v, dgate_act), each shaped like its input;
    dgate_act is float32 of shape (Hq,).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    group = H // Hkv
    dev = q.device
    do = do.to(q.dtype)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=dev)
    dk = torch.zeros((B, Hkv, S, D), dtype=k.dtype, device=dev)
    dv = torch.zeros((B, Hkv, S, D), dtype=v.dtype, device=dev)
    if B == 0 or T == 0:
        return (dq, dk, dv, torch.zeros_like(prefix_k), torch.zeros_like(prefix_v),
                torch.zeros(H, dtype=torch.float32, device=dev))
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    mask_arg = mask if mask is not None else q
    scale_log2 = softmax_scale * LOG2E
    bd, bp, prec = block_d(D), block_p(P), dot_precision(q.dtype)
    meta = dict(CAUSAL=causal, HAS_MASK=mask is not None, T_BUCKET=t_bucket(T),
                BLOCK_D=bd, DOT_PRECISION=prec)

    # 1. preprocess
    n_blocks = triton.cdiv(T, PREPROCESS_BLOCK_M)
    delta1 = torch.empty((B, H, T), dtype=torch.float32, device=dev)
    delta2 = torch.empty((B, H, T), dtype=torch.float32, device=dev)
    gate_partial = torch.empty((B, H, n_blocks), dtype=torch.float32, device=dev)
    _preprocess_kernel[(n_blocks, B * H)](
        q, prefix_k, prefix_v, gate_act, out, do, lse2, delta1, delta2, gate_partial,
        *q.stride(), *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *out.stride(), *do.stride(),
        H, T, P, D, group, scale_log2, n_blocks,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_D=bd, BLOCK_P=bp, DOT_PRECISION=prec,
    )
    count_launch("backward_preprocess")
    dgate_act = gate_partial.sum(dim=(0, 2))

    # 2. dK, dV
    if S > 0:
        args = (
            q, k, v, mask_arg, do, lse1, delta1, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *strides(mask, 2), *do.stride(),
            *dk.stride(), *dv.stride(),
            H, Hkv, T, S, D, group, softmax_scale, scale_log2,
        )
        if _dkdv_kernel_tuned is not None:
            _dkdv_kernel_tuned[lambda m: (triton.cdiv(S, m["BLOCK_N"]), B * Hkv)](*args, **meta)
        else:
            cfg = fixed_blocks(bd)
            _dkdv_kernel[(triton.cdiv(S, cfg["BLOCK_N"]), B * Hkv)](*args, **meta, **cfg)
        count_launch("backward_dkdv")

    # 3. dQ and the prefix gradients
    n_splits = _num_splits(B * H, T, dev)
    dpk_part = torch.zeros((n_splits, B, H, P, D), dtype=torch.float32, device=dev)
    dpv_part = torch.zeros((n_splits, B, H, P, D), dtype=torch.float32, device=dev)
    args = (
        q, k, v, prefix_k, prefix_v, gate_act, mask_arg, do, lse1, lse2, delta1, delta2,
        dq, dpk_part, dpv_part,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *strides(mask, 2), *do.stride(), *dq.stride(),
        H, T, S, P, D, group, n_splits, softmax_scale, scale_log2,
    )
    if _dq_kernel_tuned is not None:
        _dq_kernel_tuned[(n_splits, B * H)](*args, **meta, BLOCK_P=bp)
    else:
        _dq_kernel[(n_splits, B * H)](*args, **meta, BLOCK_P=bp, **fixed_blocks(bd))
    count_launch("backward_dq")

    # Sum the partials over splits and over the query heads of each kv group, then over the
    # batch when the prefix is shared.
    def reduce(part: torch.Tensor, like: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        grad = part.sum(0).view(B, Hkv, group, P, D).sum(2)
        if like.dim() == 3:
            grad = grad.sum(0)
        return (grad * scale).to(like.dtype)

    dpk = reduce(dpk_part, prefix_k, softmax_scale)
    return dq, dk, dv, dpk, reduce(dpv_part, prefix_v), dgate_act
