"""PEFT's adaption prompts (``AdaptionPromptConfig`` on Llama and Mistral) through one fused op.

PEFT's ``AdaptedAttention`` runs the whole wrapped attention, then recomputes the queries
(a second q_proj, plus a v_proj whose output only supplies a dtype), applies the rotary
embedding again, repeats the prefix over the batch and the kv groups, runs an eager
softmax over the prefix and a second o_proj, and adds the two outputs. The fused forward
computes the queries, keys and values once, updates transformers' cache, runs one
`gated_prefix_attention` (identity activation, PEFT's scalar gate) and one o_proj.

The modules keep their class hierarchy (the fused class subclasses PEFT's), their
parameters and their state dict, so PEFT's save_pretrained, from_pretrained, adapter
switching and disabling keep working.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.adaption_prompt.layer import AdaptedAttention
from peft.tuners.adaption_prompt.model import AdaptionPromptModel
from torch import nn

try:  # the common base of the Llama and GPT-2 wrappers (peft >= 0.17)
    from peft.tuners.adaption_prompt.layer import _BaseAdaptedAttention
except ImportError:  # older peft wraps Llama-style attention only
    _BaseAdaptedAttention = AdaptedAttention

from llama_adapter_fast.attention import BACKENDS
from llama_adapter_fast.integrations.transformers import (
    check_sliding_window,
    masked_gated_prefix_attention,
    prefix_keys_values,
)

__all__ = ["FusedAdaptedAttention", "enable_fused_adaption_prompt", "disable_fused_adaption_prompt"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding; cos and sin are (B, T, D) as transformers passes them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _cache(kwargs: dict):
    # The keyword has been past_key_value, then past_key_values, then cache.
    for name in ("cache", "past_key_values", "past_key_value"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _fallback_reason(module: AdaptedAttention, kwargs: dict) -> str | None:
    """Why a call must take PEFT's own path, or None when the fused path applies."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True needs attention weights, which the fused op does not return"
    if kwargs.get("position_embeddings") is None or kwargs.get("hidden_states") is None:
        return "the caller passed no position_embeddings (transformers older than 4.48)"
    mask = kwargs.get("attention_mask")
    if mask is not None and not isinstance(mask, torch.Tensor):
        return f"attention masks of type {type(mask).__name__} (flex attention) are not supported"
    attention = module.model
    if attention.training and getattr(attention, "attention_dropout", 0.0):
        return "attention dropout is not supported by the fused op"
    return None


class FusedAdaptedAttention(AdaptedAttention):
    """PEFT's ``AdaptedAttention`` with a fused forward (see `enable_fused_adaption_prompt`).

    Matches PEFT's arithmetic, oddities included:
    - the gate is PEFT's single ``adaption_gate`` with no activation (identity);
    - the prefix keys are ``k_proj(adaption_prompt)`` with no rotary embedding and the
      prefix is never masked, so padding queries attend to it too;
    - where o_proj has a bias, PEFT adds it twice (once in the wrapped attention and once
      in its second o_proj); so does this forward.
    Rows of padding queries may differ from PEFT's (their word part is 0 here); nothing
    downstream reads them.

    Calls the fused op cannot serve take PEFT's own forward, with a warning:
    output_attentions=True, no position_embeddings, flex attention masks, attention
    dropout in training. Masks other than causal plus key padding (sliding windows that
    bite, packed sequences, custom 4-d masks, and any 4-d mask under torch.compile) are
    computed exactly by two masked SDPA calls instead of the fused op.
    """

    fused_backend: str

    def forward(self, **kwargs):
        reason = _fallback_reason(self, kwargs)
        if reason is not None:
            warnings.warn(f"fused adaption prompt: using PEFT's forward because {reason}", stacklevel=2)
            return super().forward(**kwargs)
        attention = self.model
        hidden_states = kwargs["hidden_states"]
        B, T = hidden_states.shape[:2]
        shape = (B, T, -1, attention.head_dim)
        q = attention.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = kwargs["position_embeddings"]
        q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        cache = _cache(kwargs)
        if cache is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": kwargs.get("cache_position")}
            k, v = cache.update(k, v, attention.layer_idx, cache_kwargs)
        mask = kwargs.get("attention_mask")
        check_sliding_window(getattr(attention.config, "sliding_window", None), mask, k.shape[2])
        prefix_k, prefix_v = prefix_keys_values(attention, self.adaption_prompt, q.dtype, key_norm=False)
        out = masked_gated_prefix_attention(
            q, k, v, prefix_k, prefix_v, self.adaption_gate, attention_mask=mask, gate_activation="identity",
            softmax_scale=attention.scaling, causal=True, backend=self.fused_backend,
        )
        out = attention.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        bias = getattr(attention.o_proj, "bias", None)
        if bias is not None:
            out = out + bias  # PEFT's second o_proj adds the bias a second time
        return out, None


def _adapted_attentions(model: nn.Module) -> list[_BaseAdaptedAttention]:
    """Every adapted attention module: those in the model and those of inactive adapters,
    which PEFT keeps out of the model in AdaptionPromptModel._cached_adapters."""
    found: dict[int, _BaseAdaptedAttention] = {}
    for module in model.modules():
        if isinstance(module, _BaseAdaptedAttention):
            found[id(module)] = module
        if isinstance(module, AdaptionPromptModel):
            for cached in module._cached_adapters.values():
                for m in cached:
                    found[id(m)] = m
    return list(found.values())


def _check_fusable(module: _BaseAdaptedAttention) -> None:
    inner = module.model
    if not isinstance(module, AdaptedAttention) or not all(hasattr(inner, n) for n in (*_PROJECTIONS, "head_dim")):
        raise TypeError(
            f"model: adaption prompts on {module.model_type!r} models cannot be fused; "
            "Llama and Mistral style attention (q_proj, k_proj, v_proj, o_proj) is supported"
        )


def enable_fused_adaption_prompt(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every adapted attention of a PEFT adaption-prompt model run one fused op.

    Each adapted layer then computes its queries, keys and values once, applies the rotary
    embedding and the cache update once, runs one `gated_prefix_attention` (identity
    activation, PEFT's scalar gate, causal, the padding mask as key padding) and one
    o_proj. Outputs, gradients and greedy generation match PEFT's own forward within
    floating-point tolerance; see `FusedAdaptedAttention` for the cases it hands back to
    PEFT's forward. Parameter names and the state dict do not change. Adapters added to the
    model later are not fused: call this again (it is idempotent).

    Args:
        model: a PeftModel (or its base model) made with ``AdaptionPromptConfig`` on a Llama
            or Mistral model.
        backend: the op's backend: "auto" (the Triton kernels for CUDA tensors, two SDPA
            calls otherwise), "triton", "sdpa" or "eager".

    Returns:
        The same model, modified in place.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    modules = _adapted_attentions(model)
    if not modules:
        raise ValueError("model has no adaption prompts: make it with peft.get_peft_model and AdaptionPromptConfig")
    for module in modules:
        _check_fusable(module)
    for module in modules:
        module.__class__ = FusedAdaptedAttention
        module.fused_backend = backend
    return model


def disable_fused_adaption_prompt(model: nn.Module) -> nn.Module:
    """Undo `enable_fused_adaption_prompt`: the adapted layers run PEFT's forward again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in _adapted_attentions(model):
        if isinstance(module, FusedAdaptedAttention):
            module.__class__ = AdaptedAttention
            del module.fused_backend
    return model
