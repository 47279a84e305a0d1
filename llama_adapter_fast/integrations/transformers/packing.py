"""Packed sequences in a transformers batch: one row holding several sequences end to end,
as DataCollatorWithFlattening makes it (position_ids that restart at 0, or the
flash-attention kwargs cu_seq_lens_q and friends), read as the packed op's cu_seqlens, or,
where a sliding window bites inside a sequence (the packed op has no window), as a 4-d
mask that holds both the packing and the window."""

from __future__ import annotations

import torch

from llama_adapter_fast.ops.varlen import packed_allowed, packed_positions

Packing = tuple[torch.Tensor, torch.Tensor, int, int]  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def packed_sequences(
    kwargs: dict, batch: int, q_len: int, kv_len: int, causal: bool = True
) -> Packing | None:
    """The packing of a batch of one row holding several sequences, as transformers'
    DataCollatorWithFlattening makes it: from the flash-attention kwargs transformers passes
    along (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k), or else, in causal
    layers, from position_ids that restart at 0 inside the row (0, 1, ..., 0, 1, ...). None
    for any other batch. Encoders attend across the whole row whatever their position_ids
    (transformers builds their masks without them), so their position_ids are no packing.
    Reading position_ids reads data, so under torch.compile only the kwargs count."""
    if kwargs.get("cu_seq_lens_q") is None and not causal:
        return None
    return _read_packing(kwargs, batch, q_len, kv_len)


def packing_mask(packing: Packing, q_len: int, kv_len: int, causal: bool = True,
                 sliding_window: int | None = None) -> torch.Tensor:
    """The boolean (1, 1, T, S) mask of a packing: a query sees the keys of its own sequence
    only, causally (bottom-right aligned in each sequence) and, with a sliding window, the
    last `sliding_window` of them, as transformers' masks do."""
    allowed, _ = packed_allowed(packing[0], packing[1], q_len, kv_len, causal, sliding_window)
    return allowed[None, None]


def resolve_packing(kwargs: dict, attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, *,
                    causal: bool = True, sliding_window: int | None = None
                    ) -> tuple[Packing | None, torch.Tensor | None]:
    """(packing, attention_mask) for an attention call. A packed batch goes to the packed op
    unless a sliding window bites inside one of its sequences: then the packing and the
    window become one 4-d mask (and'ed with the model's own mask, which, with a cache,
    carries the window but not the packing), which the masked path honours exactly, so
    the sequences never see each other."""
    packing = packed_sequences(kwargs, batch, q_len, kv_len, causal)
    if packing is None or sliding_window is None or max(packing[2], packing[3]) <= sliding_window:
        return packing, attention_mask
    allowed = packing_mask(packing, q_len, kv_len, causal, sliding_window)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        given = attention_mask[..., :kv_len]
        allowed = allowed & (given if given.dtype == torch.bool else given > torch.finfo(given.dtype).min / 2)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].to(torch.bool)
    return None, allowed


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
