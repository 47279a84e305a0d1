"""Forward kernel of gated prefix attention.

One program owns BLOCK_M queries of one (sequence, query head). It computes the prefix
first: the scores q Kp^T once, their statistics m2 and l2, and the probabilities already
weighted by a / l2 = act(gate) / l2, kept in registers with the prefix values loaded at
the start. Then the word part as FlashAttention does it (one online softmax over the
allowed word keys, accumulated in `acc`), normalized, and the prefix folded into the same
accumulator with one product:

    out = acc / l1 + (a / l2) * exp2(s2 - m2) @ Vp,   lse1 = m1 + log2 l1,   lse2 = m2 + log2 l2

so no dependent memory round trip sits in a program's tail, and only one BLOCK_M x D
float32 accumulator is alive. A prefix longer than one block (P > 64), or the previous
structure (KernelSettings.prefix_first off), runs the prefix after the word loop instead:
a pass for its statistics, a pass for its product.

Scores are kept in base 2 (the softmax scale is folded with log2(e) into one multiply-add),
so both log-sum-exps are base-2. A query with no allowed word key stores lse1 = +inf: the
backward then recomputes probabilities exp2(s - lse1) = 0 for it instead of NaN.

Tiles are read through tensor descriptors (TMA, bulk copies by the copy engine, which
zero-fill rows and columns past the end) on sm_90 and newer where the tensors allow it,
else through per-thread pointers with masks (`tile_source`, `read_tile`, `write_tile`; the
launcher chooses, kernels/utils.py `use_tma`).

The same kernel serves padded batches (B sequences of T queries over S keys, with an
optional key padding mask) and packed ones (VARLEN: sequence b holds rows
cu_seqlens[b] .. cu_seqlens[b + 1] of a (total, H, D) tensor); no program crosses a
sequence boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import autotuner, launch
from .utils import (
    LOG2E,
    SETTINGS,
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
def load_tile(ptr, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid,
              MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load rows `offs_r` (64-bit offsets: row index times stride may pass 2**31) of a
    (rows, D) tile, masking only what can be out of range."""
    ptrs = ptr + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=r_valid[:, None], other=0.0)
        return tl.load(ptrs, mask=r_valid[:, None] & d_valid[None, :], other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_valid[None, :], other=0.0)


@triton.jit
def store_tile(ptr, x, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid, EVEN_D: tl.constexpr):
    ptrs = ptr + offs_r[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=r_valid[:, None])
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=r_valid[:, None] & d_valid[None, :])


@triton.jit
def tile_source(base, heads, stride_h, rows, stride_r, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Where a kernel reads (BLOCK_R, BLOCK_D) tiles of `heads` matrices of (rows, HEAD_DIM)
    at base: with TMA a tensor descriptor over all of them (the copy engine zero-fills rows
    and columns past the end and clips stores there), else the base pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[heads, rows, HEAD_DIM], strides=[stride_h, stride_r, 1],
                                         block_shape=[1, BLOCK_R, BLOCK_D])
    else:
        return base


@triton.jit
def read_tile(src, head, start, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid, MASK_ROWS: tl.constexpr,
              EVEN_D: tl.constexpr, TMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start .. start + BLOCK_R of matrix `head` of a tile_source (with pointers, `src`
    is that matrix's base and offs_r its rows)."""
    if TMA:
        return src.load([head, start, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        return load_tile(src, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid, MASK_ROWS, EVEN_D)


@triton.jit
def write_tile(dst, x, head, start, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid, EVEN_D: tl.constexpr,
               TMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (BLOCK_R, BLOCK_D) tile as read_tile reads it (x already in the output dtype)."""
    if TMA:
        dst.store([head, start, 0], x.reshape(1, BLOCK_R, BLOCK_D))
    else:
        store_tile(dst, x, offs_r, stride_r, offs_d, stride_d, r_valid, d_valid, EVEN_D)


@triton.jit
def sequence_bounds(CU_Q, CU_K, b, T_MAX, S_MAX, VARLEN: tl.constexpr):
    """(first query row, T, first key row, S) of sequence b."""
    if VARLEN:
        # int64: a row index times a row stride passes 2**31 within a large packed batch.
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        return (q_start.to(tl.int64), tl.load(CU_Q + b + 1) - q_start,
                k_start.to(tl.int64), tl.load(CU_K + b + 1) - k_start)
    zero = tl.full((), 0, tl.int64)  # the branches' types must agree; the constant folds away
    return zero, T_MAX, zero, S_MAX


@triton.jit
def word_key_ranges(start_m, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of the query rows start_m .. start_m + BLOCK_M: [0, full) need no mask
    (below every row's diagonal and inside S), [full, hi) need the causal or range mask.
    Causal masking is aligned bottom-right: query t sees keys j <= t + S - T."""
    if CAUSAL:
        shift = S - T
        hi = tl.minimum(S, tl.maximum(start_m + BLOCK_M + shift, 0))
        full = tl.minimum(tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N, S // BLOCK_N * BLOCK_N)
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _words(
    acc, m_i, l_i, q, k_src, v_src, mask_base, offs_m, offs_d, d_valid, lo, hi, T, S,
    stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The online softmax over key blocks lo .. hi. MASKED blocks may cross the diagonal or
    the end of the keys; the others are loaded and used without any mask."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < S
        k = read_tile(k_src, 0, start_n, offs_n, stride_ks, offs_d, stride_kd, n_valid, d_valid, MASKED, EVEN_D,
                      TMA, BLOCK_N, BLOCK_D)
        v = read_tile(v_src, 0, start_n, offs_n, stride_vs, offs_d, stride_vd, n_valid, d_valid, MASKED, EVEN_D,
                      TMA, BLOCK_N, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED or HAS_MASK:
            allowed = n_valid[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + (S - T))
            if HAS_MASK:
                key_ok = tl.load(mask_base + offs_n.to(tl.int64) * stride_ms, mask=n_valid, other=0) != 0
                allowed = allowed & key_ok[None, :]
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        # A row whose keys so far are all masked keeps m = -inf; shift it by 0 instead (its
        # probabilities are exp2(-inf) = 0 either way).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def prefix_scores(q, pk, p_valid, scale_log2, DOT_PRECISION: tl.constexpr):
    """Base-2 scores of the queries against one block of prefix keys (-inf past P)."""
    s2 = tl.dot(q, tl.trans(pk), input_precision=DOT_PRECISION)
    return tl.where(p_valid[None, :], s2 * scale_log2, float("-inf"))


@triton.jit
def prefix_stats(q, pk_src, offs_d, d_valid, P, stride_pkp, stride_pkd, scale_log2,
                 EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                 TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Max and sum of the prefix softmax of each query (base 2), over all P prefix keys."""
    m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    for start_p in range(0, P, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        pk = read_tile(pk_src, 0, start_p, offs_p, stride_pkp, offs_d, stride_pkd, p_valid, d_valid, True, EVEN_D,
                       TMA, BLOCK_P, BLOCK_D)
        s2 = prefix_scores(q, pk, p_valid, scale_log2, DOT_PRECISION)
        m_new = tl.maximum(m2, tl.max(s2, 1))
        l2 = l2 * tl.math.exp2(m2 - m_new) + tl.sum(tl.math.exp2(s2 - m_new[:, None]), 1)
        m2 = m_new
    return m2, l2


@triton.jit
def add_prefix(acc, q, pk_src, pv_src, offs_d, d_valid, P, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
               scale_log2, m2, weight, EVEN_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
               TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + the prefix part of each query row: its softmax over the P prefix keys (with the
    statistics m2 of prefix_stats) times `weight` (act(gate) / l2) times the prefix values."""
    for start_p in range(0, P, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        pk = read_tile(pk_src, 0, start_p, offs_p, stride_pkp, offs_d, stride_pkd, p_valid, d_valid, True, EVEN_D,
                       TMA, BLOCK_P, BLOCK_D)
        pv = read_tile(pv_src, 0, start_p, offs_p, stride_pvp, offs_d, stride_pvd, p_valid, d_valid, True, EVEN_D,
                       TMA, BLOCK_P, BLOCK_D)
        s2 = prefix_scores(q, pk, p_valid, scale_log2, DOT_PRECISION)
        p2 = tl.math.exp2(s2 - m2[:, None]) * weight[:, None]
        acc = tl.dot(p2.to(pv.dtype), pv, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=SIZES_AND_SMALL_STRIDES)
def _fwd_kernel(
    Q, K, V, PK, PV, A, MASK, CU_Q, CU_K, OUT, LSE1, LSE2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_ms,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,
    H, BH, T_MAX, S_MAX, P, GROUP, scale_log2,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr,
    T_BUCKET, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, ONE_PREFIX_BLOCK: tl.constexpr,
    PREFIX_FIRST: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One flat grid (CUDA's y and z dimensions stop at 65,535). The (sequence, head) index
    # varies fastest and query blocks run last to first: under causal masking the last
    # blocks see the most keys, so the heaviest programs start first.
    pid = tl.program_id(0)
    bh = pid % BH
    start_m = (tl.cdiv(T_MAX, BLOCK_M) - 1 - pid // BH) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = h // GROUP
    q_start, T, k_start, S = sequence_bounds(CU_Q, CU_K, b, T_MAX, S_MAX, VARLEN)
    if start_m >= T:
        return
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    q_base = Q + b * stride_qb + h * stride_qh + q_start * stride_qt
    k_src = tile_source(K + b * stride_kb + g * stride_kh + k_start * stride_ks, 1, stride_ks, S, stride_ks,
                        HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    v_src = tile_source(V + b * stride_vb + g * stride_vh + k_start * stride_vs, 1, stride_vs, S, stride_vs,
                        HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    pk_src = tile_source(PK + b * stride_pkb + g * stride_pkh, 1, stride_pkp, P, stride_pkp, HEAD_DIM, BLOCK_P,
                         BLOCK_D, TMA)
    pv_src = tile_source(PV + b * stride_pvb + g * stride_pvh, 1, stride_pvp, P, stride_pvp, HEAD_DIM, BLOCK_P,
                         BLOCK_D, TMA)
    mask_base = MASK + b * stride_mb
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < T
    d_valid = offs_d < HEAD_DIM
    q = read_tile(tile_source(q_base, 1, stride_qt, T, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D, TMA), 0, start_m,
                  offs_m, stride_qt, offs_d, stride_qd, m_valid, d_valid, True, EVEN_D, TMA, BLOCK_M, BLOCK_D)
    a = tl.load(A + bh)  # act(gate) of this sequence and head

    if PREFIX_FIRST and ONE_PREFIX_BLOCK:
        # The prefix first: its scores once, its statistics and its probabilities (already
        # weighted by a / l2, in the value dtype) kept in registers through the word loop,
        # and its values loaded now, so that the tail is one product and no memory round trip.
        offs_p = tl.arange(0, BLOCK_P)
        p_valid = offs_p < P
        pk = read_tile(pk_src, 0, 0, offs_p, stride_pkp, offs_d, stride_pkd, p_valid, d_valid, True, EVEN_D,
                       TMA, BLOCK_P, BLOCK_D)
        pv = read_tile(pv_src, 0, 0, offs_p, stride_pvp, offs_d, stride_pvd, p_valid, d_valid, True, EVEN_D,
                       TMA, BLOCK_P, BLOCK_D)
        s2 = prefix_scores(q, pk, p_valid, scale_log2, DOT_PRECISION)
        m2 = tl.max(s2, 1)
        p2 = tl.math.exp2(s2 - m2[:, None])
        l2 = tl.sum(p2, 1)
        p2 = (p2 * (a / l2)[:, None]).to(pv.dtype)

    # Words: unmasked key blocks, then the blocks on the diagonal or at the end of the keys.
    full, hi = word_key_ranges(start_m, T, S, CAUSAL, BLOCK_M, BLOCK_N)
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m1, l1 = _words(
        acc, m1, l1, q, k_src, v_src, mask_base, offs_m, offs_d, d_valid, 0, full, T, S,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
        False, CAUSAL, HAS_MASK, EVEN_D, BLOCK_N, BLOCK_D, TMA, DOT_PRECISION,
    )
    acc, m1, l1 = _words(
        acc, m1, l1, q, k_src, v_src, mask_base, offs_m, offs_d, d_valid, full, hi, T, S,
        stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, scale_log2,
        True, CAUSAL, HAS_MASK, EVEN_D, BLOCK_N, BLOCK_D, TMA, DOT_PRECISION,
    )
    empty = l1 == 0.0  # no allowed word key: the word part is 0
    l1 = tl.where(empty, 1.0, l1)
    acc = acc / l1[:, None]

    # Prefix: its own softmax over all P keys (never masked), weighted by a = act(gate).
    if PREFIX_FIRST and ONE_PREFIX_BLOCK:
        acc = tl.dot(p2, pv, acc, input_precision=DOT_PRECISION)
    else:
        m2, l2 = prefix_stats(q, pk_src, offs_d, d_valid, P, stride_pkp, stride_pkd, scale_log2,
                              EVEN_D, BLOCK_M, BLOCK_P, BLOCK_D, TMA, DOT_PRECISION)
        acc = add_prefix(acc, q, pk_src, pv_src, offs_d, d_valid, P, stride_pkp, stride_pkd, stride_pvp,
                         stride_pvd, scale_log2, m2, a / l2, EVEN_D, BLOCK_P, BLOCK_D, TMA, DOT_PRECISION)

    o_base = OUT + b * stride_ob + h * stride_oh + q_start * stride_ot
    write_tile(tile_source(o_base, 1, stride_ot, T, stride_ot, HEAD_DIM, BLOCK_M, BLOCK_D, TMA),
               acc.to(OUT.dtype.element_ty), 0, start_m, offs_m, stride_ot, offs_d, stride_od, m_valid, d_valid,
               EVEN_D, TMA, BLOCK_M, BLOCK_D)
    lse_base = b * stride_lb + h * stride_lh + q_start + offs_m
    tl.store(LSE1 + lse_base, tl.where(empty, float("inf"), m1 + tl.math.log2(l1)), mask=m_valid)
    tl.store(LSE2 + lse_base, m2 + tl.math.log2(l2), mask=m_valid)


_fwd_kernel_tuned = autotuner("forward", _fwd_kernel)


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
    """Launch the forward kernel on a padded batch. Inputs are already validated.

    gate_act: (B * Hq,) float32, the activated gate of each sequence and query head.
    key_padding_mask: (B, S) bool (True = may be attended), or None.
    Returns out (B, Hq, T, D) in q's dtype and the base-2 log-sum-exps lse1, lse2 (B, Hq, T)
    in float32.
    """
    B, H, T, D = q.shape
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse1 = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(lse1)
    if out.numel() == 0:
        return out, lse1, lse2
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    launch_forward(
        q, k, v, prefix_k, prefix_v, gate_act, mask, None, None, out, lse1, lse2,
        q.stride(), k.stride(), v.stride(), out.stride(), lse1.stride()[:2],
        B, H, k.shape[1], T, k.shape[2], causal, softmax_scale,
    )
    return out, lse1, lse2


def packed_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, h, t, d) strides of a packed (total, H, D) tensor: rows are found through the
    cumulative sequence lengths, so the batch stride is 0."""
    return 0, x.stride(1), x.stride(0), x.stride(2)


def varlen_forward(
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
    causal: bool,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on packed sequences: q (total_q, Hq, D), k and v
    (total_k, Hkv, D), sequence i at rows cu_seqlens[i] .. cu_seqlens[i + 1]; the prefix is
    (Hkv, P, D) or one per sequence (N, Hkv, P, D). Returns out like q and lse1, lse2 of
    shape (Hq, total_q) in float32."""
    total_q, H, D = q.shape
    n_seqs = cu_seqlens_q.numel() - 1
    out = torch.empty((total_q, H, D), dtype=q.dtype, device=q.device)
    lse1 = torch.empty((H, total_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(lse1)
    if out.numel() == 0 or n_seqs == 0:
        return out, lse1, lse2
    launch_forward(
        # The kernels read cu_seqlens with stride 1.
        q, k, v, prefix_k, prefix_v, gate_act, None, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), out,
        lse1, lse2,
        packed_strides(q), packed_strides(k), packed_strides(v), packed_strides(out), (0, lse1.stride(0)),
        n_seqs, H, k.shape[1], max_seqlen_q, max_seqlen_k, causal, softmax_scale,
    )
    return out, lse1, lse2


def launch_forward(q, k, v, prefix_k, prefix_v, gate_act, mask, cu_q, cu_k, out, lse1, lse2,
                   q_strides, k_strides, v_strides, out_strides, lse_strides,
                   n_seqs, H, Hkv, T_max, S_max, causal, softmax_scale) -> None:
    """Shared by the padded and the packed launcher: strides are (b, h, t, d) for both (b
    stride 0 when packed); lse_strides are (b, h) with t contiguous."""
    D = q.shape[-1]
    P = prefix_k.shape[-2]
    group = H // Hkv
    bh = n_seqs * H
    args = (
        q, k, v, prefix_k, prefix_v, gate_act, mask if mask is not None else q,
        cu_q if cu_q is not None else gate_act, cu_k if cu_k is not None else gate_act, out, lse1, lse2,
        *q_strides, *k_strides, *v_strides,
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *strides(mask, 2), *out_strides, *lse_strides,
        H, bh, T_max, S_max, P, group, softmax_scale * LOG2E,
    )
    meta = dict(
        HEAD_DIM=D, CAUSAL=causal, HAS_MASK=mask is not None, VARLEN=cu_q is not None,
        T_BUCKET=t_bucket(T_max), BLOCK_D=block_d(D), BLOCK_P=block_p(P), ONE_PREFIX_BLOCK=P <= block_p(P),
        PREFIX_FIRST=SETTINGS.prefix_first, TMA=use_tma(q, k, v, prefix_k, prefix_v, out),
        DOT_PRECISION=dot_precision(q.dtype),
    )
    launch("forward", _fwd_kernel, _fwd_kernel_tuned, lambda cfg: (triton.cdiv(T_max, cfg["BLOCK_M"]) * bh,),
           args, meta)


__all__ = ["forward", "varlen_forward", "launch_forward", "packed_strides"]
