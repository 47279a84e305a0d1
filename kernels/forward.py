"""Forward kernel of gated prefix attention.

One program owns BLOCK_M queries of one (batch, query head). It keeps two online-softmax
states: one over the P prefix keys (m2, l2, acc2) and one flash-attention pass over the
allowed word keys (m1, l1, acc1), then writes

    out = acc1 / l1 + a * acc2 / l2,   lse1 = m1 + log2 l1,   lse2 = m2 + log2 l2

Scores are kept in base 2 (the softmax scale is folded with log2(e)), so both log-sum-exps
are base-2. A query row with no allowed word key stores lse1 = +inf: the backward then
recomputes probabilities exp2(s - lse1) = 0 for it instead of NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import (
    AUTOTUNE,
    FORWARD_CONFIGS,
    block_d,
    block_p,
    count_launch,
    dot_precision,
    fixed_blocks,
    make_configs,
    prune_by_shared_memory,
    t_bucket,
)

LOG2E = 1.4426950408889634


@triton.jit
def _online_softmax_update(s, m_i, l_i, acc, v, DOT_PRECISION: tl.constexpr):
    """Fold one block of base-2 scores `s` (masked entries at -inf) and values `v` into the
    running (max, sum, accumulator). Safe when every score seen so far is -inf."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _word_block(
    q, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
    m_i, l_i, acc, S, causal_shift, scale_log2,
    CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = offs_n < S
    kt = tl.load(
        k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
        mask=n_valid[None, :] & d_valid[:, None], other=0.0,
    )
    v = tl.load(
        v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
        mask=n_valid[:, None] & d_valid[None, :], other=0.0,
    )
    s = tl.dot(q, kt, input_precision=DOT_PRECISION) * scale_log2
    allowed = n_valid[None, :]
    if CAUSAL_MASK:
        allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
    if HAS_MASK:
        key_ok = tl.load(mask_base + offs_n * stride_ms, mask=n_valid, other=0) != 0
        allowed = allowed & key_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    return _online_softmax_update(s, m_i, l_i, acc, v, DOT_PRECISION)


@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, A, MASK, OUT, LSE1, LSE2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ms,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, S, P, D, GROUP, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, T_BUCKET,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # 64-bit base offsets: a tensor may hold more than 2**31 elements.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = h // GROUP
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    pk_base = PK + b * stride_pkb + g * stride_pkh
    pv_base = PV + b * stride_pvb + g * stride_pvh
    mask_base = MASK + b * stride_mb

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < D
    q = tl.load(
        q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
        mask=m_valid[:, None] & d_valid[None, :], other=0.0,
    )

    # Prefix: its own softmax over all P keys, never masked.
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_p in range(0, P, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        pkt = tl.load(
            pk_base + offs_p[None, :] * stride_pkp + offs_d[:, None] * stride_pkd,
            mask=p_valid[None, :] & d_valid[:, None], other=0.0,
        )
        pv = tl.load(
            pv_base + offs_p[:, None] * stride_pvp + offs_d[None, :] * stride_pvd,
            mask=p_valid[:, None] & d_valid[None, :], other=0.0,
        )
        s2 = tl.dot(q, pkt, input_precision=DOT_PRECISION) * scale_log2
        s2 = tl.where(p_valid[None, :], s2, float("-inf"))
        m2, l2, acc2 = _online_softmax_update(s2, m2, l2, acc2, pv, DOT_PRECISION)

    # Words. Causal masking is aligned bottom-right: query t sees keys j <= t + S - T.
    causal_shift = S - T
    if CAUSAL:
        hi = tl.minimum(S, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
        # Keys below every row's diagonal need no causal comparison.
        full = tl.maximum(start_m + causal_shift + 1, 0) // BLOCK_N * BLOCK_N
        full = tl.minimum(full, S // BLOCK_N * BLOCK_N)
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, full, BLOCK_N):
        m1, l1, acc1 = _word_block(
            q, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
            m1, l1, acc1, S, causal_shift, scale_log2,
            False, HAS_MASK, BLOCK_N, DOT_PRECISION,
        )
    for start_n in range(full, hi, BLOCK_N):
        m1, l1, acc1 = _word_block(
            q, k_base, v_base, mask_base, offs_m, start_n, offs_d, d_valid,
            stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
            m1, l1, acc1, S, causal_shift, scale_log2,
            CAUSAL, HAS_MASK, BLOCK_N, DOT_PRECISION,
        )

    a = tl.load(A + h)
    empty = l1 == 0.0
    l1 = tl.where(empty, 1.0, l1)
    out = acc1 / l1[:, None] + a * (acc2 / l2[:, None])
    o_base = OUT + b * stride_ob + h * stride_oh
    tl.store(
        o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od,
        out.to(OUT.dtype.element_ty),
        mask=m_valid[:, None] & d_valid[None, :],
    )
    row = pid_bh.to(tl.int64) * T + offs_m
    tl.store(LSE1 + row, tl.where(empty, float("inf"), m1 + tl.math.log2(l1)), mask=m_valid)
    tl.store(LSE2 + row, m2 + tl.math.log2(l2), mask=m_valid)


_fwd_kernel_tuned = (
    triton.autotune(
        configs=make_configs(FORWARD_CONFIGS),
        key=["BLOCK_D", "CAUSAL", "HAS_MASK", "T_BUCKET", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": prune_by_shared_memory},
    )(_fwd_kernel)
    if AUTOTUNE
    else None
)


def strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    """Strides of `t` as a kernel expects them, with zeros for an absent tensor."""
    return tuple(t.stride()) if t is not None else (0,) * ndim


def prefix_strides(prefix: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, head, position, dim) strides; a prefix shared by the batch has batch stride 0."""
    if prefix.dim() == 3:
        return (0, *prefix.stride())
    return tuple(prefix.stride())


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are already validated.

    gate_act: (Hq,) float32, the activated gate of each query head.
    key_padding_mask: (B, S) uint8 or bool (nonzero = may be attended), or None.
    Returns out (B, Hq, T, D) in q's dtype and the base-2 log-sum-exps lse1, lse2 (B, Hq, T)
    in float32.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse1 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse1, lse2
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    args = (
        q, k, v, prefix_k, prefix_v, gate_act, mask if mask is not None else q, out, lse1, lse2,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *strides(mask, 2), *out.stride(),
        H, T, S, P, D, H // Hkv, softmax_scale * LOG2E,
    )
    meta = dict(
        CAUSAL=causal, HAS_MASK=mask is not None, T_BUCKET=t_bucket(T),
        BLOCK_D=block_d(D), BLOCK_P=block_p(P), DOT_PRECISION=dot_precision(q.dtype),
    )
    if _fwd_kernel_tuned is not None:
        grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * H)  # noqa: E731
        _fwd_kernel_tuned[grid](*args, **meta)
    else:
        cfg = fixed_blocks(meta["BLOCK_D"])
        _fwd_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](*args, **meta, **cfg)
    count_launch("forward")
    return out, lse1, lse2


__all__ = ["forward", "prefix_strides", "strides", "LOG2E"]
