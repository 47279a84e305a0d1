"""The seam the integrations share (transformers, PEFT, litgpt): a library's attention call,
under the library's mask, into the op.

- Masks: None, a 2-d padding mask, or a 4-d boolean or additive mask. Where it is causal (or
  bidirectional) attention plus key padding, the op gets the padding as its
  key_padding_mask; where it is not (a sliding window that bites, a custom mask), two masked
  scaled_dot_product_attention calls compute the same thing without the fused op.
- Packing: one row holding several sequences end to end, as transformers'
  DataCollatorWithFlattening makes it (position_ids that restart at 0, or the
  flash-attention kwargs cu_seq_lens_q and friends), read as the packed op's cu_seqlens, or,
  where a sliding window bites inside a sequence (the packed op has no window), as a 4-d
  mask that holds both the packing and the window.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from llama_adapter_fast.ops import gated_prefix_attention, gated_prefix_attention_varlen
from llama_adapter_fast.ops.reference import accumulation_dtype, allowed_keys, batched_prefix, gated_sum, zero_unread
from llama_adapter_fast.ops.varlen import packed_allowed, packed_positions, varlen_attention

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


class _LastMask:
    """The reading of the last 4-d mask seen. A model passes the same mask tensor to every
    layer, so the check, which costs a device-to-host sync, runs once per forward."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple | None = None
        self._value: tuple[bool, torch.Tensor | None] | None = None

    def get(self, mask: torch.Tensor, key: tuple) -> tuple[bool, torch.Tensor | None] | None:
        if self._ref is not None and self._ref() is mask and self._key == key:
            return self._value
        return None

    def put(self, mask: torch.Tensor, key: tuple, value: tuple[bool, torch.Tensor | None]) -> None:
        self._ref, self._key, self._value = weakref.ref(mask), key, value


_LAST_MASK = _LastMask()


def _allowed_from_4d(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # transformers' additive masks hold 0 where a key is attended and the dtype's minimum
        # (or -inf) where it is not.
        return mask > torch.finfo(mask.dtype).min / 2
    raise TypeError(f"attention_mask must be a bool or float tensor when 4-d, got {mask.dtype}")


def _read_4d_mask(
    mask: torch.Tensor, allowed: torch.Tensor, batch: int, q_len: int, kv_len: int, causal: bool
) -> tuple[bool, torch.Tensor | None]:
    """Whether `allowed` is causal masking plus key padding, and then the (B, S) key
    padding mask (None where nothing is padded). Reads the data: one sync on accelerators."""
    if allowed.shape[1] != 1 or allowed.shape[0] not in (1, batch) or q_len == 0 or kv_len == 0:
        return False, None
    # Causal masking is aligned to the bottom right, so the last query sees every key that
    # is not padding: its row is the key padding mask.
    key_padding = allowed[:, 0, -1, :].expand(batch, kv_len)
    expected = allowed_keys(q_len, kv_len, causal, key_padding, allowed.device)
    # Rows of padding queries (the query's own key is padding, so no real token reads their
    # output) are empty in `expected`; transformers leaves them empty or, in older versions
    # for sdpa, allows every key. Any other row must match.
    padding_row = ~expected.any(dim=-1, keepdim=True) & (~allowed.any(dim=-1, keepdim=True)
                                                         | allowed.all(dim=-1, keepdim=True))
    differs = (allowed != expected) & ~padding_row
    if mask.dtype != torch.bool:
        differs = differs | ((mask != 0) & allowed)  # an additive bias is not a mask
    differ, unpadded = torch.stack([differs.any(), key_padding.all()]).tolist()
    if differ:
        return False, None
    # Without padding the op takes no mask, which keeps its fastest path.
    return True, None if unpadded else key_padding.contiguous()


def resolve_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, causal: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Read a transformers attention mask as causal masking plus key padding where it is one.

    Args:
        attention_mask: None; a 2-d (B, S') padding mask (non-zero = attend; its last S
            columns are used, as flash attention does); or a 4-d mask (B or 1, 1 or H, T, S'
            >= S), boolean (True = attend) or additive float (0 = attend, the dtype's
            minimum or -inf = masked), as transformers builds for sdpa and eager attention.
        batch, q_len, kv_len: B, T and S of the attention call.
        causal: whether the attention is causal (bottom-right aligned).

    Returns:
        (key_padding_mask, allowed), at most one of them not None. key_padding_mask is the
        (B, S) bool mask to hand to `gated_prefix_attention` (None: no padding); allowed,
        when the mask is not causal plus key padding, is the boolean 4-d mask itself.
        Under torch.compile a 4-d mask is returned as `allowed` unread (the check would
        read data and break the graph).
    """
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__} "
            "(flex attention's BlockMask is not supported: use the sdpa or eager implementation)"
        )
    if attention_mask.dim() == 2:
        if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] < kv_len:
            raise ValueError(
                f"attention_mask must have shape ({batch}, >= {kv_len}) when 2-d, got {tuple(attention_mask.shape)}"
            )
        start = attention_mask.shape[1] - kv_len
        return attention_mask[:, start:].to(torch.bool).expand(batch, kv_len), None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2-d or 4-d, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-2] != q_len or attention_mask.shape[-1] < kv_len:
        raise ValueError(
            f"attention_mask must have shape (B, 1, {q_len}, >= {kv_len}) when 4-d, got {tuple(attention_mask.shape)}"
        )
    # Static caches give masks longer than the keys in use; transformers slices them too.
    mask = attention_mask[..., :kv_len]
    allowed = _allowed_from_4d(mask)
    if torch.compiler.is_compiling():
        return None, allowed
    # Inference tensors have no version counter; transformers builds a new mask every forward.
    version = None if attention_mask.is_inference() else attention_mask._version
    key = (version, batch, q_len, kv_len, causal)
    reading = _LAST_MASK.get(attention_mask, key)
    if reading is None:
        reading = _read_4d_mask(mask, allowed, batch, q_len, kv_len, causal)
        _LAST_MASK.put(attention_mask, key, reading)
    representable, key_padding = reading
    return (key_padding, None) if representable else (None, allowed)


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, is_causal: bool,
    scale: float | None, dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA whose rows without any allowed key give 0, not NaN, and in which a key no query
    may read (padding) cannot change the result, NaN included."""
    gqa = q.shape[1] != k.shape[1]
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    readable = allowed.any(dim=2).any(dim=1)
    k, v = zero_unread(k, readable), zero_unread(v, readable)
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=dropout, scale=scale,
                                         enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    softmax_scale: float | None = None,
    causal: bool = True,
    dropout: float = 0.0,
    packing: Packing | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plain attention (no prefix) under a transformers mask: what layers without an
    adapter run. q (B, Hq, T, D), k and v (B, Hkv, S, D); returns (B, Hq, T, D). Packed
    sequences (`packing`, from `packed_sequences`) go through the packed path on `backend`."""
    if packing is not None and dropout and not _is_4d(attention_mask):
        raise ValueError(f"attention dropout ({dropout}) over packed sequences needs a 4-d attention mask: the "
                         "packed path has no dropout, and without the mask the sequences would see each other")
    if packing is not None and not dropout:
        cu_q, _, max_q, _ = packing
        out = varlen_attention(as_packed(q), as_packed(k), as_packed(v), cu_q, max_q, causal=causal,
                               softmax_scale=softmax_scale, backend=backend)
        return out.transpose(0, 1)[None]
    B, _, T, _ = q.shape
    S = k.shape[2]
    key_padding, allowed = resolve_attention_mask(attention_mask, B, T, S, causal)
    is_causal = False
    if allowed is None:
        if key_padding is None and causal and T == S and T > 1:
            is_causal = True  # keeps the flash kernels eligible
        elif key_padding is not None or (causal and T != S and T > 1):
            allowed = allowed_keys(T, S, causal, key_padding, q.device)
    return _masked_sdpa(q, k, v, allowed, is_causal, softmax_scale, dropout)


def masked_gated_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    causal: bool = True,
    backend: str = "auto",
    packing: Packing | None = None,
) -> torch.Tensor:
    """`gated_prefix_attention` under a transformers mask, or `gated_prefix_attention_varlen`
    for packed sequences (`packing`, from `packed_sequences`, which the mask then only
    repeats).

    A mask that is causal attention plus key padding (what transformers builds for padded
    batches and KV caches) reaches the op as its key_padding_mask. Any other mask (a sliding
    window shorter than the keys, packed sequences not given as `packing`, a custom 4-d
    mask; or any 4-d mask while torch.compile traces) is honoured exactly by two masked
    scaled_dot_product_attention calls instead of the fused op, whatever `backend` says.
    """
    if packing is not None:
        out = gated_prefix_attention_varlen(
            as_packed(q), as_packed(k), as_packed(v), *packing, prefix_k, prefix_v, gate, causal=causal,
            gate_activation=gate_activation, softmax_scale=softmax_scale, backend=backend,
        )
        return out.transpose(0, 1)[None]
    key_padding, allowed = resolve_attention_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2], causal)
    if allowed is None:
        return gated_prefix_attention(
            q, k, v, prefix_k, prefix_v, gate, causal=causal, gate_activation=gate_activation,
            softmax_scale=softmax_scale, key_padding_mask=key_padding, backend=backend,
        )
    B = q.shape[0]
    word = _masked_sdpa(q, k, v, allowed, False, softmax_scale)
    prefix = _masked_sdpa(q, batched_prefix(prefix_k, B).to(q.dtype), batched_prefix(prefix_v, B).to(q.dtype), None,
                          False, softmax_scale)
    acc = accumulation_dtype(q.dtype)
    return gated_sum(word.to(acc), prefix.to(acc), gate, gate_activation).to(q.dtype)


def _is_4d(attention_mask: object) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4


def check_sliding_window(sliding_window: int | None, attention_mask: torch.Tensor | None, kv_len: int,
                         packing: Packing | None = None) -> None:
    """A sliding window is honoured only through a 4-d mask; without one it must not bite.
    Packed sequences (from `resolve_packing`, which turns a packing whose window bites into
    a 4-d mask) never reach it: each is at most the window long."""
    if sliding_window is not None and packing is None and not _is_4d(attention_mask) and kv_len > sliding_window:
        raise ValueError(
            f"a sliding window of {sliding_window} over {kv_len} keys needs a 4-d attention mask; "
            "the fused op supports causal attention with key padding only"
        )
