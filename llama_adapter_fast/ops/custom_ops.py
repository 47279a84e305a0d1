"""The fused op as torch.library custom ops with autograd.

Forward and backward launchers are registered as `llama_adapter_fast::gpa_forward` and
`llama_adapter_fast::gpa_backward` (padded batches), `gpa_varlen_forward` and
`gpa_varlen_backward` (packed sequences) and `gpa_decode` (forward only), each with a fake
implementation, and tied
together with `register_autograd`, so torch.compile sees one opaque op (no graph break) and
`torch.library.opcheck` can test the registration.
"""


import torch

try:  # triton is optional off Linux; the "sdpa" and "eager" backends work without it
    from llama_adapter_fast.kernels import backward as _bwd
    from llama_adapter_fast.kernels import decode as _decode
    from llama_adapter_fast.kernels import forward as _fwd
    from llama_adapter_fast.kernels.utils import can_run_on

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    TRITON_AVAILABLE = False

    def can_run_on(device: torch.device) -> bool:
        return False


@torch.library.custom_op("llama_adapter_fast::gpa_forward", mutates_args=())
def gpa_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: returns out and the two base-2 log-sum-exps (float32, (B, Hq, T)).
    `deterministic` chooses the backward (see `kernels.backward.backward`)."""
    return _fwd.forward(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, causal, softmax_scale)


@gpa_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, causal, softmax_scale, deterministic):
    B, H, T, D = q.shape
    lse = q.new_empty((B, H, T), dtype=torch.float32)
    return q.new_empty((B, H, T, D)), lse, torch.empty_like(lse)


@torch.library.custom_op("llama_adapter_fast::gpa_backward", mutates_args=())
def gpa_backward(
    grad_out: torch.Tensor,
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
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward: gradients of q, k, v, prefix_k, prefix_v and gate_act."""
    return _bwd.backward(
        grad_out, q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask,
        out, lse1, lse2, causal, softmax_scale, deterministic,
    )


@gpa_backward.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, out, lse1, lse2,
      causal, softmax_scale, deterministic):
    def like(t: torch.Tensor) -> torch.Tensor:
        return t.new_empty(t.shape)

    return like(q), like(k), like(v), like(prefix_k), like(prefix_v), like(gate_act)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, causal, softmax_scale, deterministic = inputs
    out, lse1, lse2 = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, out, lse1, lse2)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse1, lse2)


def _backward(ctx, grad_out, _grad_lse1, _grad_lse2):
    q, k, v, prefix_k, prefix_v, gate_act, mask, out, lse1, lse2 = ctx.saved_tensors
    grads = gpa_backward(
        grad_out, q, k, v, prefix_k, prefix_v, gate_act, mask, out, lse1, lse2,
        ctx.causal, ctx.softmax_scale, ctx.deterministic,
    )
    return (*grads, None, None, None, None)


torch.library.register_autograd(
    "llama_adapter_fast::gpa_forward", _backward, setup_context=_setup_context
)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate_act: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    softmax_scale: float,
    deterministic: bool = False,
) -> torch.Tensor:
    """The fused path on validated inputs; gate_act is act(gate) as float32 of shape (B * Hq,)."""
    out, _, _ = gpa_forward(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, causal, softmax_scale,
                            deterministic)
    return out


@torch.library.custom_op("llama_adapter_fast::gpa_varlen_forward", mutates_args=())
def gpa_varlen_forward(
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
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward on packed sequences: out (total_q, Hq, D) and the two base-2
    log-sum-exps (float32, (Hq, total_q))."""
    return _fwd.varlen_forward(q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, causal, softmax_scale)


@gpa_varlen_forward.register_fake
def _(q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      softmax_scale, deterministic):
    total_q, H, D = q.shape
    lse = q.new_empty((H, total_q), dtype=torch.float32)
    return q.new_empty((total_q, H, D)), lse, torch.empty_like(lse)


@torch.library.custom_op("llama_adapter_fast::gpa_varlen_backward", mutates_args=())
def gpa_varlen_backward(
    grad_out: torch.Tensor,
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
    out: torch.Tensor,
    lse1: torch.Tensor,
    lse2: torch.Tensor,
    causal: bool,
    softmax_scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused backward on packed sequences: gradients of q, k, v, prefix_k, prefix_v, gate_act."""
    return _bwd.varlen_backward(
        grad_out, q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, out, lse1, lse2, causal, softmax_scale, deterministic,
    )


@gpa_varlen_backward.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      out, lse1, lse2, causal, softmax_scale, deterministic):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prefix_k, prefix_v, gate_act))


def _setup_varlen_context(ctx, inputs, output) -> None:
    (q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
     causal, softmax_scale, deterministic) = inputs
    out, lse1, lse2 = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, out, lse1, lse2)
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.causal = causal
    ctx.softmax_scale = softmax_scale
    ctx.deterministic = deterministic
    ctx.mark_non_differentiable(lse1, lse2)


def _varlen_backward(ctx, grad_out, _grad_lse1, _grad_lse2):
    q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, out, lse1, lse2 = ctx.saved_tensors
    grads = gpa_varlen_backward(
        grad_out, q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen,
        out, lse1, lse2, ctx.causal, ctx.softmax_scale, ctx.deterministic,
    )
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd(
    "llama_adapter_fast::gpa_varlen_forward", _varlen_backward, setup_context=_setup_varlen_context
)


def triton_varlen_attention(
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
    deterministic: bool = False,
) -> torch.Tensor:
    """The fused packed path on validated inputs; gate_act is act(gate) as float32 (n_seqs * Hq,)."""
    out, _, _ = gpa_varlen_forward(q, k, v, prefix_k, prefix_v, gate_act, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, causal, softmax_scale, deterministic)
    return out


@torch.library.custom_op("llama_adapter_fast::gpa_decode", mutates_args=())
def gpa_decode(
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
) -> torch.Tensor:
    """The split-KV decode kernels on validated inputs (no gradient): out (B, Hq, T, D)."""
    return _decode.decode_forward(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, cache_lengths,
                                  cache_starts, causal, softmax_scale)


@gpa_decode.register_fake
def _(q, k, v, prefix_k, prefix_v, gate_act, key_padding_mask, cache_lengths, cache_starts, causal, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
