"""PyTorch implementations of gated prefix attention: the eager oracle, the concatenated
form of the original LLaMA-Adapter code, and two scaled_dot_product_attention calls.

These take validated inputs (see `attention.gated_prefix_attention`). All accept float64
too, so tests can compute the oracle in double precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GATE_ACTIVATIONS = ("tanh", "identity")


def activate_gate(gate: torch.Tensor, gate_activation: str) -> torch.Tensor:
    """act(gate): tanh (the paper's zero-init attention) or identity (PEFT, lit-llama)."""
    return torch.tanh(gate) if gate_activation == "tanh" else gate


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics and accumulation are float32 for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_keys(
    T: int, S: int, causal: bool, key_padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, S) mask of the word keys each query may attend, or None for all.

    Causal masking is aligned to the bottom right: query t sees keys j <= t + S - T.
    """
    allowed = None
    if causal:
        t = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        allowed = (j <= t + (S - T))[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def batched_prefix(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    """(Hkv, P, D) shared prefix viewed as (B, Hkv, P, D) without copying."""
    return prefix.unsqueeze(0).expand(batch, *prefix.shape) if prefix.dim() == 3 else prefix


def per_query_head(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, Hkv, ..., D) repeated to num_heads heads, each kv head for its group of query heads."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1)


def zero_unread(x: torch.Tensor, readable: torch.Tensor | None) -> torch.Tensor:
    """x (B, H, S, D) with the keys no query may read set to 0; readable is (B or 1, S) bool
    or None for all. A masked key's probability is 0, but 0 * NaN and 0 * inf are NaN: memory
    a sequence does not hold (padding, a cache's unused tail) must not enter any product,
    of the forward or of the backward. The gradient of an unread key is 0."""
    if readable is None:
        return x
    return torch.where(readable[:, None, :, None], x, 0.0)


def softmax_attend(scores: torch.Tensor, allowed: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """softmax(scores) @ v with masked keys; a row with no allowed key gives 0, not NaN."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if allowed is not None:
        probs = probs.masked_fill(~allowed, 0.0)
    return (probs.to(v.dtype) @ v).to(scores.dtype)


def gate_weights(gate: torch.Tensor, gate_activation: str, dtype: torch.dtype) -> torch.Tensor:
    """act(gate) shaped to multiply (B, H, T, D): one for all, one per query head (Hq,) or
    one per sample and query head (B, Hq)."""
    a = activate_gate(gate.to(dtype), gate_activation)
    return a[..., None, None] if a.dim() == 2 else a.reshape(-1, 1, 1)


def gated_sum(o1: torch.Tensor, o2: torch.Tensor, gate: torch.Tensor, gate_activation: str) -> torch.Tensor:
    """o1 + act(gate) * o2 in o1's dtype (see `gate_weights` for the gate's shapes)."""
    return o1 + gate_weights(gate, gate_activation, o1.dtype) * o2


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The oracle: materialized scores, float32 softmax, two branches, gated sum.

    Products run in the input dtype (as a low-precision eager implementation would), the
    softmax and the sum in float32 (float64 for float64 inputs).
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    acc = accumulation_dtype(q.dtype)
    k, v = zero_unread(k, key_padding_mask), zero_unread(v, key_padding_mask)
    k, v = per_query_head(k, H), per_query_head(v, H)
    pk = per_query_head(batched_prefix(prefix_k, B), H)
    pv = per_query_head(batched_prefix(prefix_v, B), H)
    allowed = allowed_keys(T, S, causal, key_padding_mask, q.device)
    o1 = softmax_attend((q @ k.transpose(-1, -2)).to(acc) * scale, allowed, v)
    o2 = softmax_attend((q @ pk.transpose(-1, -2)).to(acc) * scale, None, pv)
    return gated_sum(o1, o2, gate, gate_activation).to(q.dtype)


def concat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The original implementation's form: one score matrix over [prefix, words], a softmax
    over each part separately, the prefix probabilities scaled by act(gate), then one
    product with the concatenated values. A second oracle for the two-branch form."""
    B, H, T, D = q.shape
    S, P = k.shape[2], prefix_k.shape[-2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    acc = accumulation_dtype(q.dtype)
    k, v = zero_unread(k, key_padding_mask), zero_unread(v, key_padding_mask)
    keys = torch.cat([batched_prefix(prefix_k, B), k], dim=2)
    values = torch.cat([batched_prefix(prefix_v, B), v], dim=2)
    keys, values = per_query_head(keys, H), per_query_head(values, H)
    scores = (q @ keys.transpose(-1, -2)).to(acc) * scale
    prefix_probs = torch.softmax(scores[..., :P], dim=-1)
    word_scores = scores[..., P:]
    allowed = allowed_keys(T, S, causal, key_padding_mask, q.device)
    if allowed is not None:
        word_scores = word_scores.masked_fill(~allowed, float("-inf"))
    word_probs = torch.softmax(word_scores, dim=-1)
    if allowed is not None:
        word_probs = word_probs.masked_fill(~allowed, 0.0)
    a = gate_weights(gate, gate_activation, acc)
    probs = torch.cat([a * prefix_probs, word_probs], dim=-1)
    return (probs @ values.to(acc)).to(q.dtype)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Two calls of torch's scaled_dot_product_attention plus the gated sum: how litgpt and
    LLaMA2-Accessory compute it. Without padding, a causal square problem uses is_causal so
    that the flash and cuDNN kernels stay eligible."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    gqa = H != Hkv
    if S == 0:
        o1 = q.new_zeros(B, H, T, D)
    elif key_padding_mask is None and (not causal or T == S or T == 1):
        o1 = F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and T == S and T > 1, scale=scale, enable_gqa=gqa
        )
    else:
        allowed = allowed_keys(T, S, causal, key_padding_mask, q.device)
        has_key = allowed.any(dim=-1, keepdim=True)
        k, v = zero_unread(k, key_padding_mask), zero_unread(v, key_padding_mask)
        # SDPA gives NaN for a row with nothing allowed: let such rows see every key, then
        # zero them (their gradients are then zero as well).
        o1 = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed | ~has_key, scale=scale, enable_gqa=gqa
        )
        o1 = o1.masked_fill(~has_key, 0.0)
    pk, pv = batched_prefix(prefix_k, B), batched_prefix(prefix_v, B)
    o2 = F.scaled_dot_product_attention(q, pk, pv, scale=scale, enable_gqa=gqa)
    acc = accumulation_dtype(q.dtype)
    return gated_sum(o1.to(acc), o2.to(acc), gate, gate_activation).to(q.dtype)
