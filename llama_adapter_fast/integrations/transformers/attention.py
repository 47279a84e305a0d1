"""The attention implementation registered with transformers as "llama_adapter_fast", and
its mask function: adapted layers run the gated prefix attention, the others plain
attention, each under whatever mask transformers built."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from llama_adapter_fast.integrations.masked_attention import (
    check_sliding_window,
    masked_attention,
    masked_gated_prefix_attention,
    resolve_packing,
)

ATTENTION_NAME = "llama_adapter_fast"
PROMPT_NAME = "adaption_prompt"
GATE_NAME = "adaption_gate"
ADAPTER_PARAMETER_NAMES = (PROMPT_NAME, GATE_NAME)
# Attention features of some transformers models that the op does not have.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
# The self-attention modules this integration adapts, by the names of their query, key and
# value projections and of their head size. The output projection is the model's business
# (o_proj in Llama, out_proj in CLIP, a sibling module in BERT): the attention function
# returns the heads before it.
_ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "head_dim"),  # Llama, Mistral, Qwen2, ViT, CLIP
    ("query", "key", "value", "attention_head_size"),  # BERT, RoBERTa
)


def attention_layout(module: nn.Module) -> tuple[str, str, str, str] | None:
    """The names (query, key, value, head size) under which `module` holds a self-attention's
    projections, or None where it is not a self-attention of a known layout. Cross-attention
    (keys and values from another sequence) is not one."""
    if getattr(module, "is_cross_attention", False) or "CrossAttention" in type(module).__name__:
        return None
    for names in _ATTENTION_LAYOUTS:
        if all(isinstance(getattr(module, n, None), nn.Module) for n in names[:3]) and isinstance(
            getattr(module, names[3], None), int
        ):
            return names
    return None


def prefix_keys_values(
    module: nn.Module, prompt: torch.Tensor, dtype: torch.dtype, *, key_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix keys and values of an adaption prompt: the layer's own key and value
    projections (and k_norm, where the model has one) applied to the prompt, with no
    rotary embedding.

    Returns two (Hkv, P, D) views, shared by the batch."""
    layout = attention_layout(module)
    if layout is None:
        raise TypeError(f"module: {type(module).__name__} is not a self-attention of a known layout")
    _, key_name, value_name, head_name = layout
    x = prompt.reshape(-1, prompt.shape[-1]).to(dtype)
    P, head_dim = x.shape[0], getattr(module, head_name)
    prefix_k = getattr(module, key_name)(x).view(P, -1, head_dim)
    prefix_v = getattr(module, value_name)(x).view(P, -1, head_dim)
    norm = getattr(module, "k_norm", None) if key_norm else None
    if norm is not None:
        prefix_k = norm(prefix_k)
    return prefix_k.transpose(0, 1), prefix_v.transpose(0, 1)


def llama_adapter_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered with transformers as ``"llama_adapter_fast"``.

    query (B, Hq, T, D) and key, value (B, Hkv, S, D) come after the rotary embedding and
    the cache update. A module with an ``adaption_prompt`` (see `add_llama_adapter`) runs
    the gated prefix attention; any other runs plain attention. Returns (B, T, Hq, D) and
    no attention weights.
    """
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"the {ATTENTION_NAME!r} attention does not support {name}")
    if kwargs.get("output_attentions"):
        # transformers would return an empty tuple: the op never materializes the probabilities.
        raise ValueError(f"output_attentions=True: the {ATTENTION_NAME!r} attention computes no attention "
                         "probabilities (they are never materialized); read them from the base model, or after "
                         "remove_llama_adapter")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = kwargs.get("sliding_window")
    packing, attention_mask = resolve_packing(kwargs, attention_mask, query.shape[0], query.shape[2], key.shape[2],
                                              causal=causal, sliding_window=window)
    check_sliding_window(window, attention_mask, key.shape[2], packing)
    prompt = getattr(module, PROMPT_NAME, None)
    backend = getattr(module, "adaption_backend", "auto")
    if prompt is None:
        out = masked_attention(query, key, value, attention_mask=attention_mask, softmax_scale=scaling,
                               causal=causal, dropout=dropout, packing=packing, backend=backend)
        return out.transpose(1, 2), None
    if dropout:
        raise ValueError(
            f"attention dropout ({dropout}) is not supported in adapted layers: build the model with an attention "
            "dropout of 0 (config.attention_dropout, or config.attention_probs_dropout_prob for BERT, RoBERTa and ViT)"
        )
    prefix_k, prefix_v = prefix_keys_values(module, prompt, query.dtype)
    out = masked_gated_prefix_attention(
        query, key, value, prefix_k, prefix_v, getattr(module, GATE_NAME),
        attention_mask=attention_mask, gate_activation=module.adaption_gate_activation,
        softmax_scale=scaling, causal=causal, backend=backend, packing=packing,
    )
    return out.transpose(1, 2), None


def llama_adapter_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int | torch.Tensor = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask function registered with transformers' AttentionMaskInterface.

    For the plain causal mask over keys that end with the queries (no cache, or a dynamic
    cache), and for the plain bidirectional mask of encoders, it returns the (B, S) bool
    padding mask, or None where nothing is padded, so the kernel gets key padding without
    any 4-d mask being built (whether a layer is causal is the attention's business, as it
    is in transformers' flash attention). Anything else (sliding windows, packed sequences,
    static caches, custom mask functions) gets transformers' own 4-d boolean mask, which
    the attention function reads.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    try:
        from transformers.masking_utils import bidirectional_mask_function
    except ImportError:  # transformers without encoder masks in masking_utils
        bidirectional_mask_function = None

    offsets_known = isinstance(q_offset, int) and isinstance(kv_offset, int) and kv_offset == 0
    if mask_function is None or mask_function is causal_mask_function:
        plain = offsets_known and q_offset + q_length == kv_length
    else:  # bidirectional: every query sees every key that is not padding
        plain = offsets_known and mask_function is bidirectional_mask_function
    if plain:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length:
            padding = attention_mask.to(torch.bool)
            # No padding at all: say so, so that causal layers without an adapter keep is_causal.
            if not torch.compiler.is_compiling() and bool(padding.all()):
                return None
            return padding
    kwargs.pop("allow_is_causal_skip", None)
    if mask_function is not None:
        kwargs["mask_function"] = mask_function
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs,
    )


def register_attention() -> str:
    """Register the attention function (and, on transformers >= 4.53, its mask function)
    under the name ``"llama_adapter_fast"``; returns the name. Idempotent."""
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.50 keeps a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = llama_adapter_attention
    else:
        AttentionInterface.register(ATTENTION_NAME, llama_adapter_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        # Older models build a 4-d additive mask themselves, which the attention reads.
        pass
    else:
        AttentionMaskInterface.register(ATTENTION_NAME, llama_adapter_mask)
    return ATTENTION_NAME
