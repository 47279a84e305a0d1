"""Decode kernels of gated prefix attention: a few new queries per sequence over a KV cache.

A generation step has T = 1 new query per sequence (a few for a chunk), and its cost is
reading the cache. The training forward would give each (sequence, query head) its own
program with one real row in 64 or 128, and read each kv head's keys once per query head
of its group. Here instead:

Split kernel: one program per (sequence, kv head, row block, split). Its rows are the
GROUP query heads of the kv head times the T new queries (row r: head g * GROUP + r // T,
query r % T), so each kv head's keys and values are read once for its whole group (once
per row block where GROUP x T passes a block). The cached keys are cut into NUM_SPLITS
ranges, one per program, so that a batch of one sequence still fills the GPU
(Flash-Decoding). Each program writes, per row, the maximum and the sum of its part of the
softmax (base 2) and its unnormalized accumulator, in float32.

Combine kernel: one program per (sequence, kv head, row block). It merges the splits in
order (deterministic: no atomics), normalizes the word part, adds the prefix part (its own
softmax over the P prefix keys, scaled by a = act(gate), computed once per sequence and
head) and writes the output.

Cache layout: k and v are (B, Hkv, S_MAX, D) with any strides (a preallocated cache or a
view of one). Sequence b holds keys first_b .. len_b - 1 (LENS and STARTS, or 0 .. S_MAX - 1
without them; a key padding mask may remove more), and its T queries are its last T
positions: with causal masking query t sees keys j <= len_b - T + t.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import decode_block_m, decode_sm_count, launch
from .forward import add_prefix, load_tile, prefix_stats
from .utils import LOG2E, block_d, dot_precision, prefix_strides, strides

# Sizes a GPU must not specialize (see utils.SIZES_AND_SMALL_STRIDES): T = 1 or a group of 1
# would otherwise compile other binaries.
DECODE_SIZES = ("H", "HKV", "T", "S_MAX", "P", "GROUP", "SPLIT_SIZE", "NUM_SPLITS", "ROW_BLOCKS",
                "stride_mb", "stride_ms")

# Keys a split reads at least, so that a split's fixed costs (its queries, its partial
# results) stay small beside its reads; and the most splits of one (sequence, kv head).
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


def decode_dot_precision(dtype: torch.dtype, head_dim: int) -> str:
    """The training kernels' precision (tf32x3 for float32), except float32 at head dims
    above 128: there tf32x3's three-part operands spill in every tile (20 bytes to 1.5 KB
    per thread in the compile report) and plain FMAs ("ieee", exact float32) do not; a
    decode step does a few multiply-adds per byte it reads, so the FMAs cost little."""
    if dtype == torch.float32 and head_dim > 128:
        return "ieee"
    return dot_precision(dtype)


@triton.jit
def _held_keys(mask_base, offs_n, first, hi, stride_ms, HAS_MASK: tl.constexpr):
    """The keys of a block that the sequence holds: first <= key < hi and, with a key
    padding mask, not padding. Only these are loaded (the others load as 0): a masked
    probability is 0, but 0 * NaN is NaN, and a cache's unused memory may hold anything."""
    held = (offs_n < hi) & (offs_n >= first)
    if HAS_MASK:  # 32-bit offsets: a mask row is far below 2**31 bytes (64-bit ones spilled)
        held = held & (tl.load(mask_base + offs_n * stride_ms, mask=held, other=0) != 0)
    return held


@triton.jit
def _rows(rb, g, T, GROUP, BLOCK_M: tl.constexpr):
    """Query head, query index and validity of the rows of row block rb of kv head g."""
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    return g * GROUP + rows // T, rows % T, rows < GROUP * T


@triton.jit(do_not_specialize=DECODE_SIZES)
def _decode_split_kernel(
    Q, K, V, MASK, LENS, STARTS, M_PART, L_PART, ACC_PART,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_ms,
    H, HKV, T, S_MAX, GROUP, SPLIT_SIZE, NUM_SPLITS, ROW_BLOCKS, scale_log2,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_LENS: tl.constexpr,
    HAS_STARTS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    rb = (pid // NUM_SPLITS) % ROW_BLOCKS
    bg = pid // (NUM_SPLITS * ROW_BLOCKS)
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)
    length = S_MAX
    if HAS_LENS:
        length = tl.maximum(tl.minimum(tl.load(LENS + b).to(tl.int32), S_MAX), 0)
    first = 0
    if HAS_STARTS:
        first = tl.maximum(tl.load(STARTS + b).to(tl.int32), 0)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    h, t, r_valid = _rows(rb, g, T, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=r_valid[:, None] & d_valid[None, :], other=0.0)

    # This split's keys, from the first block holding a key of the sequence.
    lo = tl.maximum(split * SPLIT_SIZE, first // BLOCK_N * BLOCK_N)
    hi = tl.minimum(split * SPLIT_SIZE + SPLIT_SIZE, length)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        read = _held_keys(MASK + b * stride_mb, offs_n, first, hi, stride_ms, HAS_MASK)
        k = load_tile(k_base, offs_n, stride_ks, offs_d, stride_kd, read, d_valid, True, EVEN_D)
        v = load_tile(v_base, offs_n, stride_vs, offs_d, stride_vd, read, d_valid, True, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        allowed = read[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= (length - T + t)[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = tl.math.exp2(s * scale_log2 - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Partial results of row (b, h, t) and this split; an empty split writes (-inf, 0, 0).
    part = ((b * H + h) * T + t) * NUM_SPLITS + split
    tl.store(M_PART + part, m_i, mask=r_valid)
    tl.store(L_PART + part, l_i, mask=r_valid)
    acc_ptrs = ACC_PART + part[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(acc_ptrs, acc, mask=r_valid[:, None] & d_valid[None, :])


@triton.jit(do_not_specialize=DECODE_SIZES)
def _decode_combine_kernel(
    Q, PK, PV, A, M_PART, L_PART, ACC_PART, OUT,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_pkb, stride_pkh, stride_pkp, stride_pkd,
    stride_pvb, stride_pvh, stride_pvp, stride_pvd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, HKV, T, P, GROUP, NUM_SPLITS, ROW_BLOCKS, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # BLOCK_N counts prefix keys here.
    pid = tl.program_id(0)
    rb = pid % ROW_BLOCKS
    bg = pid // ROW_BLOCKS
    b = (bg // HKV).to(tl.int64)
    g = (bg % HKV).to(tl.int64)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    h, t, r_valid = _rows(rb, g, T, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    rd_valid = r_valid[:, None] & d_valid[None, :]

    # The word part: the splits merged in order.
    part = ((b * H + h) * T + t) * NUM_SPLITS
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(0, NUM_SPLITS):
        m_s = tl.load(M_PART + part + split, mask=r_valid, other=float("-inf"))
        l_s = tl.load(L_PART + part + split, mask=r_valid, other=0.0)
        acc_s = tl.load(ACC_PART + (part + split)[:, None] * HEAD_DIM + offs_d[None, :], mask=rd_valid, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        beta = tl.math.exp2(m_s - m_safe)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # no allowed word key: the word part is 0
    acc = acc / l_i[:, None]

    # The prefix part: its own softmax over all P keys, weighted by a = act(gate) of each row's head.
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=rd_valid, other=0.0)
    pk_base = PK + b * stride_pkb + g * stride_pkh
    pv_base = PV + b * stride_pvb + g * stride_pvh
    m2, l2 = prefix_stats(q, pk_base, offs_d, d_valid, P, stride_pkp, stride_pkd, scale_log2,
                          EVEN_D, BLOCK_M, BLOCK_N, BLOCK_D, False, DOT_PRECISION)
    # act(gate) of each row's sequence and head (the sequence's index in 32 bits: B * H is small).
    weight = tl.load(A + (bg // HKV) * H + h, mask=r_valid, other=0.0) / l2
    acc = add_prefix(acc, q, pk_base, pv_base, offs_d, d_valid, P, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                     scale_log2, m2, weight, EVEN_D, BLOCK_N, BLOCK_D, False, DOT_PRECISION)

    o_ptrs = OUT + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=rd_valid)


def num_splits(programs: int, keys: int, sm_count: int) -> int:
    """Splits of each (sequence, kv head, row block)'s keys: enough programs for two of
    them per multiprocessor, each split reading at least MIN_KEYS_PER_SPLIT keys, at most
    MAX_SPLITS."""
    wanted = triton.cdiv(2 * sm_count, max(programs, 1))
    return max(1, min(wanted, triton.cdiv(max(keys, 1), MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def decode_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cache_lengths: torch.Tensor | None,
    cache_starts: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    splits: int | None = None,
    max_length: int | None = None,
    sm_count: int | None = None,
) -> torch.Tensor:
    """Launch the split and combine kernels. Inputs are validated: q (B, Hq, T, D) with
    T small (ops.attention.MAX_DECODE_QUERIES), k and v (B, Hkv, S_MAX, D), gate_act (B * Hq,)
    float32 (one per sequence and head), the mask (B, S_MAX) bool or None, cache_lengths and
    cache_starts (B,) integers or None. `max_length` (at most S_MAX, default S_MAX) bounds
    the lengths and sizes the splits; `splits` overrides their number, `sm_count` the
    multiprocessors they are sized for (default: the device's). Returns out (B, Hq, T, D)
    in q's dtype."""
    B, H, T, D = q.shape
    Hkv, S_max = k.shape[1], k.shape[2]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    group = H // Hkv
    keys = S_max if max_length is None else min(max_length, S_max)
    elem = q.element_size()
    split_m = decode_block_m("decode", group * T, D, elem)
    row_blocks = triton.cdiv(group * T, split_m)
    block_n = decode_block_n("decode", split_m, D, elem)
    if splits is None:
        splits = num_splits(B * Hkv * row_blocks, keys, sm_count or decode_sm_count(q.device))
    split_size = triton.cdiv(triton.cdiv(max(keys, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(keys, split_size))  # no split left without keys
    m_part = torch.empty((B, H, T, splits), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty((B, H, T, splits, D), dtype=torch.float32, device=q.device)
    mask = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else None
    placeholder = gate_act
    args = (
        q, k, v, mask if mask is not None else placeholder,
        cache_lengths if cache_lengths is not None else placeholder,
        cache_starts if cache_starts is not None else placeholder,
        m_part, l_part, acc_part,
        *q.stride(), *k.stride(), *v.stride(), *strides(mask, 2),
        H, Hkv, T, keys, group, split_size, splits, row_blocks, softmax_scale * LOG2E,
    )
    meta = dict(HEAD_DIM=D, CAUSAL=causal, HAS_MASK=mask is not None, HAS_LENS=cache_lengths is not None,
                HAS_STARTS=cache_starts is not None, BLOCK_D=block_d(D), DOT_PRECISION=decode_dot_precision(q.dtype, D))
    launch("decode", _decode_split_kernel, None, lambda cfg: (B * Hkv * row_blocks * splits,), args, meta,
           block_m=split_m)

    combine_m = decode_block_m("decode_combine", group * T, D, elem)
    combine_blocks = triton.cdiv(group * T, combine_m)
    args = (
        q, prefix_k, prefix_v, gate_act, m_part, l_part, acc_part, out,
        *q.stride(), *prefix_strides(prefix_k), *prefix_strides(prefix_v), *out.stride(),
        H, Hkv, T, prefix_k.shape[-2], group, splits, combine_blocks, softmax_scale * LOG2E,
    )
    meta = dict(HEAD_DIM=D, BLOCK_D=block_d(D), DOT_PRECISION=decode_dot_precision(q.dtype, D))
    launch("decode_combine", _decode_combine_kernel, None, lambda cfg: (B * Hkv * combine_blocks,), args, meta,
           block_m=combine_m)
    return out


def decode_block_n(kernel: str, block_m: int, head_dim: int, elem_bytes: int) -> int:
    """The key block of the candidate with this row block (the split size is a multiple)."""
    from .configs import INTERPRET, INTERPRETER_BLOCKS, candidates

    if INTERPRET:
        return INTERPRETER_BLOCKS[kernel]["BLOCK_N"]
    return next(c.block_n for c in candidates(kernel, head_dim, elem_bytes) if c.block_m == block_m)


__all__ = ["decode_forward", "num_splits"]
