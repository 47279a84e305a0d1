"""The packed op: `gated_prefix_attention_varlen`, for sequences concatenated without padding
(the layout of FlashAttention's `flash_attn_varlen_func`), with its checks and its
references."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama_adapter_fast.ops import custom_ops
from llama_adapter_fast.ops.attention import (
    autocast_inputs,
    check_gate,
    check_key_value,
    check_like_q,
    check_options,
    check_prefix,
    check_tensor,
    kernel_gate,
    resolve_backend,
    resolve_deterministic,
)
from llama_adapter_fast.ops.reference import (
    eager_attention,
    sdpa_attention,
)


def _check_cu_seqlens(name: str, cu: object, total: int, device: torch.device) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() == 0:
        raise ValueError(f"{name} must be 1-d with N + 1 entries (N sequences), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {cu.device}")
    if torch.compiler.is_compiling():
        return  # the value checks read the tensor: eager calls make them
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the number of packed rows ({total}), got {values[-1]}")


def _check_max_seqlen(name: str, value: object, cu: torch.Tensor, total: int) -> int:
    """The value, at most `total`: no sequence is longer than all rows, and the kernels'
    grids and partial buffers are sized by it (a max_position_embeddings passed here would
    otherwise size them)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    if not torch.compiler.is_compiling() and cu.numel() > 1:
        longest = int((cu[1:] - cu[:-1]).max())
        if value < longest:
            raise ValueError(f"{name} ({value}) is below the longest sequence ({longest})")
    return min(int(value), total)


def _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, prefix_k, prefix_v,
                         gate, causal, gate_activation, softmax_scale, backend):
    check_options(causal, gate_activation, softmax_scale, backend)
    q = check_tensor("q", q, (3,))
    k = check_tensor("k", k, (3,))
    v = check_tensor("v", v, (3,))
    prefix_k = check_tensor("prefix_k", prefix_k, (3, 4))
    prefix_v = check_tensor("prefix_v", prefix_v, (3, 4))
    total_q, Hq, D = q.shape
    total_k, Hkv = k.shape[0], k.shape[1]
    check_key_value(k, v, Hq, Hkv, D)
    check_like_q(q, k=k, v=v, prefix_k=prefix_k, prefix_v=prefix_v)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q.device)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's {cu_seqlens_q.numel()} entries (one sequence "
                         f"of keys per sequence of queries), got {cu_seqlens_k.numel()}")
    n_seqs = cu_seqlens_q.numel() - 1
    check_prefix(prefix_k, prefix_v, n_seqs, Hkv, D, batch_name="sequence")
    max_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q, cu_seqlens_q, total_q)
    max_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k, cu_seqlens_k, total_k)
    return check_gate(gate, Hq, q.device, n_seqs, batch_name="sequence"), max_q, max_k


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions 0, 1, ... restarting at each record of packed sequences of `total` tokens."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    return torch.arange(total, device=cu_seqlens.device) - torch.repeat_interleave(starts, lengths, output_size=total)


def packed_allowed(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int,
                   causal: bool, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed (total_q, total_k) bool, the sequence of each query row): a query sees the
    keys of its own sequence only, causally aligned to the bottom right of that sequence,
    and with a sliding window the last `sliding_window` of them (key position > query
    position - window, as transformers counts it). Built from comparisons only: no value
    of cu_seqlens is read on the host."""
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    rows = torch.arange(total_q, device=cu_q.device)
    cols = torch.arange(total_k, device=cu_q.device)
    seq_q = torch.searchsorted(cu_q[1:], rows, right=True)
    seq_k = torch.searchsorted(cu_k[1:], cols, right=True)
    # A query's place among its sequence's keys: a chunk of T new queries ends at its S keys' end.
    pos_q = rows - cu_q[seq_q] + (cu_k[seq_q + 1] - cu_k[seq_q]) - (cu_q[seq_q + 1] - cu_q[seq_q])
    pos_k = cols - cu_k[seq_k]
    allowed = seq_q[:, None] == seq_k[None, :]
    if causal:
        allowed = allowed & (pos_k[None, :] <= pos_q[:, None])
    if sliding_window is not None:
        allowed = allowed & (pos_k[None, :] > pos_q[:, None] - sliding_window)
    return allowed, seq_q


def _right_aligned(x: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows (total, H, D) as a padded batch (N, H, width, D), each sequence in the
    last columns of its row, and the (N, width) mask of the columns that hold it. Padding
    columns are 0, never another sequence's rows. Built from comparisons and a gather only:
    no value of cu_seqlens is read on the host."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    position = torch.arange(width, device=x.device)[None, :] - (width - lengths)[:, None]  # within the sequence
    held = position >= 0
    rows = (cu[:-1, None] + position).clamp(0, max(x.shape[0] - 1, 0))
    padded = torch.where(held[:, :, None, None], x[rows], 0.0)
    return padded.transpose(1, 2), held


def _padded_varlen(attention: Callable[..., torch.Tensor], q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                   max_seqlen_k: int, prefix_k, prefix_v, gate, **options) -> torch.Tensor:
    """The packed op as the padded `attention` (eager or sdpa) on a batch of its N sequences,
    what torch.compile traces for those backends (the loop of `varlen_reference` reads the
    sequence lengths, data a graph cannot hold). Each sequence sits right-aligned in
    max_seqlen_q query rows and max_seqlen_k key columns, so the batch's bottom-right causal
    alignment is each sequence's own; padding columns are masked and hold zeros, so no
    sequence reads another's memory."""
    total_q = q.shape[0]
    if total_q == 0 or max_seqlen_q == 0:
        return q.new_zeros(q.shape)
    qp, _ = _right_aligned(q, cu_seqlens_q, max_seqlen_q)
    kp, held_k = _right_aligned(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = _right_aligned(v, cu_seqlens_k, max_seqlen_k)
    out = attention(qp, kp, vp, prefix_k, prefix_v, gate, key_padding_mask=held_k, **options)  # (N, H, Tq, D)
    # Packed query row r of sequence i sits in column r - cu_seqlens_q[i + 1] + max_seqlen_q.
    rows = torch.arange(total_q, device=q.device)
    ends = cu_seqlens_q[1:].long()
    seq_q = torch.searchsorted(ends, rows, right=True)
    return out.transpose(1, 2)[seq_q, rows - ends[seq_q] + max_seqlen_q]


def varlen_reference(
    attention: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The padded op `attention` (eager_attention or sdpa_attention) run on each packed
    sequence alone, as a batch of one."""
    # split (not one slice per sequence): its backward is one concatenation of the pieces.
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    pieces_q = q.split(lengths_q)
    pieces_k, pieces_v = k.split(lengths_k), v.split(lengths_k)

    def batch_of_one(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(0)

    outs = []
    for i in range(len(lengths_q)):
        pk = prefix_k if prefix_k.dim() == 3 else prefix_k[i:i + 1]
        pv = prefix_v if prefix_v.dim() == 3 else prefix_v[i:i + 1]
        g = gate if gate.dim() < 2 else gate[i:i + 1]
        out = attention(batch_of_one(pieces_q[i]), batch_of_one(pieces_k[i]), batch_of_one(pieces_v[i]),
                        pk, pv, g, **kwargs)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


def gated_prefix_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
) -> torch.Tensor:
    """LLaMA-Adapter's zero-initialized gated attention on packed sequences.

    Sequence i holds the query rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] of q and the key
    rows cu_seqlens_k[i] .. cu_seqlens_k[i + 1] of k and v; no query sees another
    sequence's keys. Each sequence is computed as `gated_prefix_attention` would compute it
    alone.

    Args:
        q: (total_q, Hq, D) queries of all sequences, concatenated.
        k, v: (total_k, Hkv, D) keys and values; Hq must be a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32 cumulative lengths, from 0 to total_q and
            total_k (non-decreasing: a sequence may be empty).
        max_seqlen_q, max_seqlen_k: the longest sequence of queries and of keys (ints; the
            kernels' grids are sized by them).
        prefix_k, prefix_v: (Hkv, P, D) shared by all sequences, or (N, Hkv, P, D) one per
            sequence; never masked.
        gate, gate_activation, softmax_scale, backend, deterministic: as for
            `gated_prefix_attention`.
        causal: causal masking aligned to the bottom right of each sequence (query t of a
            sequence of T queries over S keys sees keys j <= t + S - T), so KV-cache chunks
            of several sequences work.

    Returns:
        (total_q, Hq, D) in q's dtype. Gradients flow to every input that requires them.
    """
    gate, max_q, max_k = _check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              prefix_k, prefix_v, gate, causal, gate_activation, softmax_scale,
                                              backend)
    deterministic = resolve_deterministic(deterministic)
    dtype_before = q.dtype
    q, k, v, prefix_k, prefix_v = autocast_inputs(q, k, v, prefix_k, prefix_v)
    backend = resolve_backend(backend, q, autocast=q.dtype != dtype_before)
    if backend in ("eager", "sdpa"):
        options = dict(causal=causal, gate_activation=gate_activation, softmax_scale=softmax_scale)
        attention = eager_attention if backend == "eager" else sdpa_attention
        if torch.compiler.is_compiling():
            return _padded_varlen(attention, q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, prefix_k, prefix_v,
                                  gate, **options)
        return varlen_reference(attention, q, k, v, cu_seqlens_q, cu_seqlens_k, prefix_k, prefix_v, gate, **options)
    gate_act = kernel_gate(gate, gate_activation, cu_seqlens_q.numel() - 1, q.shape[1])
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return custom_ops.triton_varlen_attention(q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k,
                                              max_q, max_k, causal, scale, deterministic)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plain attention (no prefix) of packed sequences, q (L, Hq, D) and k, v (L, Hkv, D)
    with the same cu_seqlens: what the layers without an adapter run. Where the fused
    kernels run it is the packed op with a zero gate (its prefix part then weighs nothing);
    elsewhere, one scaled_dot_product_attention call per sequence (under torch.compile, one
    call over the sequences padded)."""
    on_triton = resolve_backend(backend, q) == "triton"
    if on_triton or torch.compiler.is_compiling():  # (the loop below reads the lengths)
        prefix = q.new_zeros(k.shape[1], 1, q.shape[-1])
        gate = q.new_zeros((), dtype=torch.float32)
        options = dict(causal=causal, gate_activation="identity", softmax_scale=softmax_scale)
        if on_triton:
            return gated_prefix_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, prefix,
                                                 prefix, gate, backend="triton", **options)
        return _padded_varlen(sdpa_attention, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, prefix,
                              prefix, gate, **options)
    gqa = q.shape[1] != k.shape[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    # split (not one slice per sequence): its backward is one concatenation of the pieces.
    outs = [F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in pieces), is_causal=causal,
                                           scale=softmax_scale, enable_gqa=gqa).transpose(0, 1)
            for pieces in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)]
    return torch.cat(outs) if outs else q.new_empty(q.shape)
