"""Packed sequences in a transformers batch: one row holding several sequences end to end,
as DataCollatorWithFlattening makes it (position_ids that restart at 0, or the
flash-attention kwargs cu_seq_lens_q and friends), read as the packed op's cu_seqlens."""

from __future__ import annotations

import torch

from llama_adapter_fast.ops.varlen import packed_positions

Packing = tuple[torch.Tensor, torch.Tensor, int, int]  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def packed_sequences(
    kwargs: dict, batch: int, q_len: int, kv_len: int, sliding_window: int | None = None
) -> Packing | None:
    """The packing of a batch of one row holding several sequences, as transformers'
    DataCollatorWithFlattening makes it: from the flash-attention kwargs transformers passes
    along (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k), or else from
    position_ids that restart at 0 inside the row (0, 1, ..., 0, 1, ...). None for any other
    batch, and where a sliding window bites inside a sequence (the packed op has no window:
    only a 4-d mask honours it). Reading position_ids reads data, so under torch.compile
    only the kwargs count."""
    packing = _read_packing(kwargs, batch, q_len, kv_len)
    if packing is not None and sliding_window is not None and packing[3] > sliding_window:
        return None
    return packing


def _read_packing(kwargs: dict, batch: int, q_len: int, kv_len: int) -> Packing | None:
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k", max_q)
        if max_q is None:
            raise ValueError("cu_seq_lens_q needs max_length_q (the flash-attention kwargs come together)")
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    positions = kwargs.get("position_ids")
    # One row of q_len positions only: (1, L) text positions, not multi-axis (rope-section) ones.
    if (positions is None or batch != 1 or q_len != kv_len or q_len < 2 or positions.numel() != q_len
            or torch.compiler.is_compiling()):
        return None
    positions = positions.reshape(-1)
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
    if not torch.equal(positions, packed_positions(cu, q_len)):
        return None  # not sequences laid end to end
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def as_packed(x: torch.Tensor) -> torch.Tensor:
    """(1, H, L, D) as the packed op's (L, H, D), a view."""
    return x[0].transpose(0, 1)
