"""PEFT's adaption prompts (``AdaptionPromptConfig`` on Llama, Mistral and GPT-2) through the fused op.

PEFT's ``AdaptedAttention`` (Llama, Mistral) runs the whole wrapped attention, then
recomputes the queries (a second q_proj, plus a v_proj whose output only supplies a dtype),
applies the rotary embedding again, repeats the prefix over the batch and the kv groups,
runs an eager softmax over the prefix and a second o_proj, and adds the two outputs. The
fused forward computes the queries, keys and values once, updates transformers' cache, runs
one `gated_prefix_attention` (identity activation, PEFT's scalar gate) and one o_proj.

PEFT's ``AdaptedAttentionGPT`` (GPT-2) runs the whole wrapped attention, then runs c_attn
over the hidden states a second time for the queries, repeats the prefix over the batch and
runs an eager softmax over it, and adds the prefix output after c_proj: the prefix output
never passes through the output projection. One op cannot return that sum (the op adds the
two parts before any projection), so the fused GPT-2 forward runs c_attn once, GPT-2's own
attention function for the words (whatever implementation the model uses), and the fused
op for the prefix alone (no word keys), shared by the batch.

The modules keep their class hierarchy (the fused class subclasses PEFT's), their
parameters and their state dict, so PEFT's save_pretrained, from_pretrained, adapter
switching and disabling keep working.

PEFT's ``adapter_names=`` (one adapter name per sample, "__base__" for the base model), which
PEFT's LoRA takes in ``forward`` and ``generate``, works for fused adaption prompts too: a
batch mixes the model's adapters, each sample with its own prefix and gate in one fused call
per layer. (PEFT's own adaption prompt drops that argument and runs the active adapter on
every sample.)
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from peft.tuners.adaption_prompt.layer import AdaptedAttention
from peft.tuners.adaption_prompt.model import AdaptionPromptModel
from torch import nn

try:  # the common base of the Llama and GPT-2 wrappers (peft >= 0.17)
    from peft.tuners.adaption_prompt.layer import AdaptedAttentionGPT, _BaseAdaptedAttention
except ImportError:  # older peft wraps Llama-style attention only
    _BaseAdaptedAttention = AdaptedAttention
    AdaptedAttentionGPT = None

from llama_adapter_fast.integrations.masked_attention import (
    check_sliding_window,
    masked_gated_prefix_attention,
    resolve_packing,
)
from llama_adapter_fast.integrations.transformers.attention import prefix_keys_values
from llama_adapter_fast.ops.attention import BACKENDS, gated_prefix_attention

__all__ = [
    "FusedAdaptedAttention",
    "FusedAdaptedAttentionGPT",
    "enable_fused_adaption_prompt",
    "disable_fused_adaption_prompt",
    "BASE_ADAPTER_NAME",
]

# PEFT's name for "no adapter" in adapter_names.
BASE_ADAPTER_NAME = "__base__"

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# What the fused GPT-2 forward reads from transformers' GPT2Attention.
_GPT2_ATTRIBUTES = ("c_attn", "c_proj", "resid_dropout", "attn_dropout", "split_size", "head_dim", "scaling",
                    "layer_idx")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding; cos and sin are (B, T, D) as transformers passes them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


# The cache's keyword has been past_key_value, then past_key_values, then cache.
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def _cache(kwargs: dict):
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _attentions_requested() -> bool:
    """Whether transformers' output capture is collecting attention weights (transformers 5
    records them with hooks on the attention modules instead of passing output_attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return collected is not None and "attentions" in collected


def _fallback_reason(module: AdaptedAttention, kwargs: dict) -> str | None:
    """Why a call must take PEFT's own path, or None when the fused path applies."""
    if kwargs.get("output_attentions") or _attentions_requested():
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
    dropout in training. Packed sequences (DataCollatorWithFlattening's position_ids, or
    the flash-attention kwargs) take the packed op. Masks other than causal plus key padding
    (sliding windows that bite, custom 4-d masks, and any 4-d mask under torch.compile) are
    computed exactly by two masked SDPA calls instead of the fused op.
    """

    fused_backend: str
    # While a call with adapter_names runs: each sample's adapted attention of this layer
    # (None for the base), set by `_mixed_batch`.
    mixed_batch: list | None = None

    def forward(self, **kwargs):
        reason = _fallback_reason(self, kwargs)
        if reason is not None and self.mixed_batch is not None:
            raise ValueError(f"adapter_names: a batch that mixes adapters runs the fused op, but {reason}")
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
        window = getattr(attention.config, "sliding_window", None)
        packing, mask = resolve_packing(kwargs, mask, B, T, k.shape[2], causal=True, sliding_window=window)
        check_sliding_window(window, mask, k.shape[2], packing)
        if self.mixed_batch is None:
            prefix_k, prefix_v = prefix_keys_values(attention, self.adaption_prompt, q.dtype, key_norm=False)
            gate = self.adaption_gate
        else:
            if packing is not None:
                raise ValueError("adapter_names: packed sequences cannot mix adapters (one name per row of a batch)")
            prefix_k, prefix_v, gate = self._mixed_prefix(q, B)
        out = masked_gated_prefix_attention(
            q, k, v, prefix_k, prefix_v, gate, attention_mask=mask, gate_activation="identity",
            softmax_scale=attention.scaling, causal=True, backend=self.fused_backend, packing=packing,
        )
        out = attention.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        bias = getattr(attention.o_proj, "bias", None)
        if bias is not None:
            out = out + bias  # PEFT's second o_proj adds the bias a second time
        return out, None

    def _mixed_prefix(self, q: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample prefix keys and values (B, Hkv, P, D) and gates (B, Hq): each adapter's
        prefix computed once; a sample of the base gets zeros under a zero gate."""
        per_sample = self.mixed_batch
        if len(per_sample) != batch_size:
            raise ValueError(f"adapter_names must hold one name per sample of the batch ({batch_size}), got "
                             f"{len(per_sample)}")
        attention, heads = self.model, q.shape[1]
        used = list(dict.fromkeys(m for m in per_sample if m is not None))
        pairs = [prefix_keys_values(attention, m.adaption_prompt, q.dtype, key_norm=False) for m in used]
        zero = q.new_zeros((attention.config.num_key_value_heads, self.adapter_len, attention.head_dim))
        slot = torch.tensor([0 if m is None else used.index(m) + 1 for m in per_sample], device=q.device)
        prefix_k = torch.stack([zero, *(k for k, _ in pairs)])[slot]
        prefix_v = torch.stack([zero, *(v for _, v in pairs)])[slot]
        gates = torch.stack([torch.zeros_like(self.adaption_gate).expand(heads),
                             *(m.adaption_gate.expand(heads) for m in used)])
        return prefix_k, prefix_v, gates[slot]


def _gpt2_word_attention(attention: nn.Module, q, k, v, attention_mask, **kwargs) -> tuple[torch.Tensor, object]:
    """GPT-2's own attention over the words, chosen as GPT2Attention.forward chooses it:
    returns (B, T, H, D) and the attention weights, if the implementation gives any."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    implementation = attention.config._attn_implementation
    if implementation == "eager" and getattr(attention, "reorder_and_upcast_attn", False):
        return attention._upcast_and_reordered_attn(q, k, v, attention_mask)
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    else:
        interface = eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    dropout = attention.attn_dropout.p if attention.training else 0.0
    return interface(attention, q, k, v, attention_mask, dropout=dropout, scaling=attention.scaling, **kwargs)


class FusedAdaptedAttentionGPT(AdaptedAttentionGPT if AdaptedAttentionGPT is not None else nn.Module):
    """PEFT's ``AdaptedAttentionGPT`` with a fused forward (see `enable_fused_adaption_prompt`).

    Matches PEFT's GPT-2 arithmetic, oddities included:
    - the prefix output is added after c_proj and its dropout: it never passes through the
      output projection (the Llama path projects it with o_proj);
    - the prefix scores are scaled by 1/sqrt(head_dim) whatever GPT-2 scales the word
      scores by (``scale_attn_weights=False`` and ``scale_attn_by_inverse_layer_idx`` change
      the word part only);
    - the prefix keys and values are c_attn(adaption_prompt), biases included, with no
      position embedding, and the prefix is never masked;
    - the gate is one scalar per layer with no activation (identity), in the model's dtype;
    - attention dropout and c_proj's dropout apply to the word part only.
    The word attention is GPT-2's own (eager with ``reorder_and_upcast_attn``, sdpa, flash
    or any registered implementation, with the mask the model built), so one fused op call
    per layer serves the prefix alone, over no word keys. Calls with output_attentions=True
    or encoder_hidden_states take PEFT's own forward, with a warning.
    """

    fused_backend: str

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_past=None,
        attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ):
        # PEFT's forward drops layer_past and passes head_mask and use_cache on to an
        # attention that ignores them; so does this one.
        reason = None
        if output_attentions or _attentions_requested():
            reason = "output_attentions=True needs attention weights, which the fused op does not return"
        elif encoder_hidden_states is not None:
            reason = "cross-attention (encoder_hidden_states) is not supported"
        if reason is not None:
            warnings.warn(f"fused adaption prompt: using PEFT's forward because {reason}", stacklevel=2)
            return super().forward(
                hidden_states, layer_past=layer_past, attention_mask=attention_mask, head_mask=head_mask,
                encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                use_cache=use_cache, output_attentions=output_attentions, **kwargs,
            )
        attention = self.model
        B, T = hidden_states.shape[:2]
        shape = (B, T, -1, attention.head_dim)
        q, k, v = (x.view(shape).transpose(1, 2) for x in attention.c_attn(hidden_states).split(attention.split_size,
                                                                                               dim=2))
        cache = _cache(kwargs)
        for name in _CACHE_NAMES:
            kwargs.pop(name, None)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache
            k, v = cache.update(k, v, attention.layer_idx, {"cache_position": kwargs.get("cache_position")})
        words, weights = _gpt2_word_attention(attention, q, k, v, attention_mask, **kwargs)
        words = attention.resid_dropout(attention.c_proj(words.reshape(B, T, -1).contiguous()))

        P = self.adaption_prompt.shape[-2]
        _, prefix_k, prefix_v = attention.c_attn(self.adaption_prompt.to(q.dtype)).split(attention.split_size, dim=-1)
        prefix_k, prefix_v = (x.reshape(P, -1, attention.head_dim).transpose(0, 1) for x in (prefix_k, prefix_v))
        no_words = q[:, :, :0]
        prefix = gated_prefix_attention(
            q, no_words, no_words, prefix_k, prefix_v, self.adaption_gate, causal=False,
            gate_activation="identity", softmax_scale=attention.head_dim ** -0.5, backend=self.fused_backend,
        )
        out = words + prefix.transpose(1, 2).reshape(B, T, -1)
        return out.to(q.dtype), weights


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


def _fused_class(module: _BaseAdaptedAttention) -> type:
    """The fused subclass for one of PEFT's adapted attentions; TypeError where there is none."""
    inner = module.model
    if AdaptedAttentionGPT is not None and isinstance(module, AdaptedAttentionGPT):
        if all(hasattr(inner, n) for n in _GPT2_ATTRIBUTES) and not getattr(inner, "is_cross_attention", False):
            return FusedAdaptedAttentionGPT
    elif isinstance(module, AdaptedAttention) and all(hasattr(inner, n) for n in (*_PROJECTIONS, "head_dim")):
        return FusedAdaptedAttention
    raise TypeError(
        f"model: adaption prompts on {module.model_type!r} models with {type(inner).__name__} cannot be fused; "
        "Llama and Mistral style attention (q_proj, k_proj, v_proj, o_proj) and transformers' GPT2Attention "
        "(c_attn, c_proj, scaling) are supported"
    )


def _layer_modules(adaption: AdaptionPromptModel, name: str) -> list[_BaseAdaptedAttention]:
    """The adapted attentions of adapter `name`, layer by layer (in the model when active)."""
    if name == adaption._active_adapter:
        target = adaption.peft_config[name].target_modules
        return [getattr(parent, target) for parent in adaption._parents[name]]
    return adaption._cached_adapters[name]


@contextmanager
def _mixed_batch(adaption: AdaptionPromptModel, *args, adapter_names: Sequence[str] | None = None, **kwargs):
    """PEFT's forward hooks of an adaption-prompt model (PeftModel enters them around forward
    and generate): with `adapter_names`, each adapted layer of the active adapter serves
    every sample with that sample's adapter of the same layer."""
    if adapter_names is None:
        yield
        return
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
        raise ValueError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER_NAME and n not in adaption.peft_config}, key=str)
    if unknown:
        raise ValueError(f"adapter_names: no adapter named {unknown}; the model has {sorted(adaption.peft_config)} "
                         f"and {BASE_ADAPTER_NAME!r} for the base")
    active = adaption._active_adapter
    config = adaption.peft_config[active]
    for name in set(adapter_names) - {BASE_ADAPTER_NAME}:
        other = adaption.peft_config[name]
        if (other.adapter_layers, other.adapter_len, other.target_modules) != (
                config.adapter_layers, config.adapter_len, config.target_modules):
            raise ValueError(f"adapter_names: adapter {name!r} ({other.adapter_layers} layers x {other.adapter_len} "
                             f"prompts) cannot share a batch with the active {active!r} ({config.adapter_layers} x "
                             f"{config.adapter_len}): a mixed batch needs the same layers and prompt length")
    wrapped = _layer_modules(adaption, active)
    if not all(isinstance(m, FusedAdaptedAttention) for m in wrapped):
        raise TypeError("adapter_names: a batch that mixes adapters needs the fused adaption prompt "
                        "(enable_fused_adaption_prompt) on Llama or Mistral style attention")
    per_adapter = {name: _layer_modules(adaption, name) for name in set(adapter_names) - {BASE_ADAPTER_NAME}}
    for i, module in enumerate(wrapped):
        module.mixed_batch = [None if n == BASE_ADAPTER_NAME else per_adapter[n][i] for n in adapter_names]
    try:
        yield
    finally:
        for module in wrapped:
            module.mixed_batch = None


def _adaption_models(model: nn.Module) -> list[AdaptionPromptModel]:
    return [m for m in model.modules() if isinstance(m, AdaptionPromptModel)]


def enable_fused_adaption_prompt(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every adapted attention of a PEFT adaption-prompt model run the fused op.

    Each adapted Llama or Mistral layer then computes its queries, keys and values once,
    applies the rotary embedding and the cache update once, runs one
    `gated_prefix_attention` (identity activation, PEFT's scalar gate, causal, the padding
    mask as key padding) and one o_proj (see `FusedAdaptedAttention`). Each adapted GPT-2
    layer computes c_attn once, runs GPT-2's own attention for the words and the fused op
    for the prefix (see `FusedAdaptedAttentionGPT`). Outputs, gradients and greedy
    generation match PEFT's own forward within floating-point tolerance. Parameter names and
    the state dict do not change. Adapters added to the model later are not fused: call this
    again (it is idempotent).

    PEFT's ``adapter_names=`` then works in ``forward`` and ``generate``: one adapter name
    per sample ("__base__" for the base model), a batch mixing the model's adapters (of the
    same layers and prompt length), each sample answered as its adapter alone.

    Args:
        model: a PeftModel (or its base model) made with ``AdaptionPromptConfig`` on a Llama,
            Mistral or GPT-2 model.
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
    classes = [_fused_class(module) for module in modules]
    for module, cls in zip(modules, classes, strict=True):
        module.__class__ = cls
        module.fused_backend = backend
    for adaption in _adaption_models(model):  # PeftModel enters these around forward and generate
        adaption._enable_peft_forward_hooks = functools.partial(_mixed_batch, adaption)
    return model


def disable_fused_adaption_prompt(model: nn.Module) -> nn.Module:
    """Undo `enable_fused_adaption_prompt`: the adapted layers run PEFT's forward again."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in _adapted_attentions(model):
        if isinstance(module, (FusedAdaptedAttention, FusedAdaptedAttentionGPT)):
            module.__class__ = type(module).__bases__[0]  # PEFT's own class
            del module.fused_backend
    for adaption in _adaption_models(model):
        adaption.__dict__.pop("_enable_peft_forward_hooks", None)
    return model
