"""Decoding: a few new queries per sequence over a KV cache, forward only.

`gated_prefix_attention_decode` takes the cache as generation holds it, preallocated
(B, Hkv, S_max, D) with a length per sequence (and optionally a first valid position, for
left-padded batches), without a mask tensor. `gated_prefix_attention` itself takes the
same kernels (see `use_decode_kernels`) when the queries are few and no gradient is
needed, which is what generation through the package's model and the integrations does.

The Triton path is the split-KV kernels of `kernels/decode.py`; "sdpa" and "eager" compute
the same masks in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_adapter_fast.ops import custom_ops
from llama_adapter_fast.ops.attention import (
    MAX_DECODE_QUERIES,
    autocast_inputs,
    check_gate,
    check_key_value,
    check_like_q,
    check_options,
    check_prefix,
    check_tensor,
    kernel_gate,
    resolve_backend,
)
from llama_adapter_fast.ops.reference import accumulation_dtype, gated_sum, softmax_attend, zero_unread


def cache_keys(S: int, cache_lengths: torch.Tensor | None, cache_starts: torch.Tensor | None,
               key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B or 1, S) bool: the cached keys sequence b holds, cache_starts[b] .. cache_lengths[b] - 1
    (less the key padding mask's holes)."""
    keys = torch.arange(S, device=device)[None, :]
    held = keys < (cache_lengths.long()[:, None] if cache_lengths is not None else S)
    if cache_starts is not None:
        held = held & (keys >= cache_starts.long()[:, None])
    if key_padding_mask is not None:
        held = held & key_padding_mask
    return held


def cache_allowed(T: int, S: int, cache_lengths: torch.Tensor | None, cache_starts: torch.Tensor | None,
                  causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(B or 1, 1, T, S) bool: the cached keys each new query may attend. Sequence b holds
    keys cache_starts[b] .. cache_lengths[b] - 1 and its T queries are its last T positions."""
    allowed = cache_keys(S, cache_lengths, cache_starts, key_padding_mask, device)[:, None, None, :]
    if causal:
        length = cache_lengths.long().clamp(0, S)[:, None] if cache_lengths is not None else S
        keys = torch.arange(S, device=device)
        query_pos = length - T + torch.arange(T, device=device)[None, :]  # (B or 1, T)
        allowed = allowed & (keys[None, None, :] <= query_pos[:, :, None])[:, None]
    return allowed


def _masked_reference(q, k, v, prefix_k, prefix_v, gate, allowed, gate_activation, softmax_scale, eager: bool):
    """Two-branch attention with a general boolean mask (B or 1, 1, T, S)."""
    B, H, T, D = q.shape
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    acc = accumulation_dtype(q.dtype)
    group = H // k.shape[1]
    pk = prefix_k.unsqueeze(0).expand(B, *prefix_k.shape) if prefix_k.dim() == 3 else prefix_k
    pv = prefix_v.unsqueeze(0).expand(B, *prefix_v.shape) if prefix_v.dim() == 3 else prefix_v
    if eager:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        pk, pv = pk.repeat_interleave(group, dim=1), pv.repeat_interleave(group, dim=1)
        o1 = softmax_attend((q @ k.transpose(-1, -2)).to(acc) * scale, allowed, v)
        o2 = softmax_attend((q @ pk.transpose(-1, -2)).to(acc) * scale, None, pv)
        return gated_sum(o1, o2, gate, gate_activation).to(q.dtype)
    has_key = allowed.any(dim=-1, keepdim=True)
    o1 = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale,
                                        enable_gqa=group > 1).masked_fill(~has_key, 0.0)
    o2 = F.scaled_dot_product_attention(q, pk, pv, scale=scale, enable_gqa=group > 1)
    return gated_sum(o1.to(acc), o2.to(acc), gate, gate_activation).to(q.dtype)


def _check_cache_vector(name: str, x: object, B: int, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape (B,) or None, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must have dtype torch.int32 or torch.int64, got {x.dtype}")
    if x.shape != (B,):
        raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    return x


def gated_prefix_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lengths: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    cache_starts: torch.Tensor | None = None,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    max_cache_len: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated prefix attention of T new queries per sequence over a KV cache (no gradient).

    Args:
        q: (B, Hq, T, D), 1 <= T <= 16, any strides. The new tokens' keys and values must
            already be in the cache: query t of sequence b is at position
            cache_lengths[b] - T + t.
        k_cache, v_cache: (B, Hkv, S_max, D), any strides (a preallocated cache or a view).
        cache_lengths: (B,) int32 or int64: sequence b holds positions < cache_lengths[b]
            (the new tokens included). Values are not read back to the host (that would
            cost a synchronization per layer and step): a length above S_max counts as
            S_max, a query whose position precedes cache_starts sees no word key.
        prefix_k, prefix_v, gate, causal, gate_activation, softmax_scale: as in
            `gated_prefix_attention`.
        cache_starts: (B,) first valid position of each sequence (a left-padded batch),
            or None for 0.
        max_cache_len: an upper bound of cache_lengths known to the caller (at most S_max);
            it sizes the key splits, so a cache far longer than its contents is not walked.
        backend: "triton" (the split-KV decode kernels), "sdpa", "eager", or "auto".

    Returns:
        (B, Hq, T, D) in q's dtype.
    """
    check_options(causal, gate_activation, softmax_scale, backend)
    q = check_tensor("q", q, (4,))
    k_cache = check_tensor("k_cache", k_cache, (4,))
    v_cache = check_tensor("v_cache", v_cache, (4,))
    prefix_k = check_tensor("prefix_k", prefix_k, (3, 4))
    prefix_v = check_tensor("prefix_v", prefix_v, (3, 4))
    B, Hq, T, D = q.shape
    if not 1 <= T <= MAX_DECODE_QUERIES:
        raise ValueError(f"q must hold 1 to {MAX_DECODE_QUERIES} new queries per sequence (dim 2), got {T}")
    if k_cache.shape[0] != B:
        raise ValueError(f"k_cache must have shape (B, Hkv, S_max, D) with q's B = {B}, got {tuple(k_cache.shape)}")
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    check_key_value(k_cache, v_cache, Hq, Hkv, D, names=("k_cache", "v_cache"))
    check_prefix(prefix_k, prefix_v, B, Hkv, D)
    check_like_q(q, k_cache=k_cache, v_cache=v_cache, prefix_k=prefix_k, prefix_v=prefix_v)
    gate = check_gate(gate, Hq, q.device, B)
    if cache_lengths is None:
        raise TypeError("cache_lengths must be an integer tensor of shape (B,)")
    cache_lengths = _check_cache_vector("cache_lengths", cache_lengths, B, q.device)
    cache_starts = _check_cache_vector("cache_starts", cache_starts, B, q.device)
    if max_cache_len is not None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int):
            raise TypeError(f"max_cache_len must be an int or None, got {type(max_cache_len).__name__}")
        if not 0 <= max_cache_len <= S_max:
            raise ValueError(f"max_cache_len must be between 0 and the cache's S_max = {S_max}, got {max_cache_len}")
    if any(x.requires_grad for x in (q, k_cache, v_cache, prefix_k, prefix_v, gate)) and torch.is_grad_enabled():
        raise ValueError("gated_prefix_attention_decode computes no gradient: call it under torch.no_grad() "
                         "or use gated_prefix_attention for training")

    dtype_before = q.dtype
    q, k_cache, v_cache, prefix_k, prefix_v = autocast_inputs(q, k_cache, v_cache, prefix_k, prefix_v)
    backend = resolve_backend(backend, q, autocast=q.dtype != dtype_before)
    if max_cache_len is not None:
        k_cache, v_cache = k_cache[:, :, :max_cache_len], v_cache[:, :, :max_cache_len]
    if backend in ("sdpa", "eager"):
        S = k_cache.shape[2]
        held = cache_keys(S, cache_lengths, cache_starts, None, q.device)
        k_cache, v_cache = zero_unread(k_cache, held), zero_unread(v_cache, held)
        allowed = cache_allowed(T, S, cache_lengths, cache_starts, causal, None, q.device)
        return _masked_reference(q, k_cache, v_cache, prefix_k, prefix_v, gate, allowed, gate_activation,
                                 softmax_scale, eager=backend == "eager")
    scale = float(softmax_scale) if softmax_scale is not None else D**-0.5
    return custom_ops.gpa_decode(q, k_cache, v_cache, prefix_k, prefix_v, kernel_gate(gate, gate_activation, B, Hq),
                                 None, cache_lengths, cache_starts, causal, scale)


__all__ = ["gated_prefix_attention_decode", "cache_allowed", "cache_keys"]
