"""litgpt's LLaMA-Adapter (``litgpt.adapter``) and LLaMA-Adapter V2 (``litgpt.adapter_v2``)
through the fused op.

litgpt's adapted ``CausalSelfAttention.scaled_dot_product_attention(q, k, v, mask)`` calls
the base attention for the words, derives the prefix keys and values from the layer's
``adapter_wte`` prompt through its fused qkv projection, calls the base attention a second
time over the prefix, and returns ``y + gating_factor * ay``. The fused method replaces that
pair of calls with one `gated_prefix_attention` (identity gate, litgpt's per-head factor),
at the same seam, so that litgpt's forward (rotary embedding, KV cache, GQA, the output
projection, adapter_v2's bias-and-scale linear layers) is untouched, and so are the
parameter names and litgpt's checkpoints.

What differs from litgpt's own method, on purpose:
- the prefix keys and values are computed at every forward from the current weights (in
  training, once per layer and forward; without gradients they are kept while the prompt
  and the qkv weights are unchanged). litgpt stores them in ``adapter_kv_cache`` at the
  first forward and reuses them ever after (litgpt issue 1287), which breaks the second
  training step and freezes the prompt in generation; the fused method never reads that
  cache.
- litgpt's base forward repeats the word keys and values over the query heads before the
  seam (GQA and MQA, in training); the fused method hands the op a strided view of one
  head per group, so the kernels read each key once (the repeat itself happens before the
  seam and stays).
"""

from __future__ import annotations

import math
import warnings

import torch
from litgpt.adapter import CausalSelfAttention as AdapterAttention
from litgpt.adapter_v2 import CausalSelfAttention as AdapterV2Attention
from litgpt.model import CausalSelfAttention as BaseAttention
from torch import nn

from llama_adapter_fast.integrations.masked_attention import masked_gated_prefix_attention
from llama_adapter_fast.ops.attention import BACKENDS

__all__ = [
    "PREFIX_PROJECTIONS",
    "FusedAdapterAttention",
    "FusedAdapterV2Attention",
    "enable_fused_adapter",
    "disable_fused_adapter",
]

# "litgpt": litgpt's own slicing of the prompt's qkv output (its checkpoints' numbers);
# "own": the rows the layer takes its own keys and values from (the paper's projection).
PREFIX_PROJECTIONS = ("litgpt", "own")


def prefix_keys_values(attention: AdapterAttention, projection: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix keys and values of one adapted litgpt layer, (n_query_groups, aT, hs) each.

    litgpt's base attention splits its fused qkv output as [all queries | all keys | all
    values], but its adapter views the prompt's qkv output as if it were interleaved per
    query group, (aT, groups, q_per_kv + 2, hs), and takes slot q_per_kv of each group as
    the key and slot q_per_kv + 1 as the value ("litgpt"). Those are other rows of the
    projection than the layer's own keys and values, except with one query group (MQA),
    where the two layouts coincide. "own" takes the layer's own key and value rows.
    No rotary embedding, as in litgpt.
    """
    config = attention.config
    aT, groups, hs = config.adapter_prompt_length, config.n_query_groups, config.head_size
    aqkv = attention.qkv(attention.adapter_wte.weight)  # (aT, (n_head + 2 groups) hs)
    if projection == "litgpt":
        q_per_kv = config.n_head // groups
        aqkv = aqkv.view(aT, groups, q_per_kv + 2, hs)
        keys, values = aqkv[:, :, q_per_kv], aqkv[:, :, q_per_kv + 1]
    else:
        q_size, kv_size = config.n_head * hs, groups * hs
        keys = aqkv[:, q_size:q_size + kv_size].view(aT, groups, hs)
        values = aqkv[:, q_size + kv_size:].view(aT, groups, hs)
    return keys.transpose(0, 1), values.transpose(0, 1)


def _one_head_per_group(k: torch.Tensor, n_head: int, groups: int) -> torch.Tensor:
    """A strided view of one head per query group of k when litgpt repeated it to n_head
    heads (the gradient of the view reaches the same group through repeat_interleave)."""
    if groups != n_head and k.shape[1] == n_head:
        return k[:, :: n_head // groups]
    return k


class _FusedPrefixAttention:
    """The fused ``scaled_dot_product_attention`` shared by litgpt's adapter attentions."""

    fused_backend: str
    fused_prefix_projection: str

    def scaled_dot_product_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.block_idx < self.config.adapter_start_layer:
            return BaseAttention.scaled_dot_product_attention(self, q, k, v, mask)
        config = self.config
        prefix_k, prefix_v = self._fused_prefix(q.dtype)
        if config.attention_logit_softcapping is not None:
            return self._litgpt_arithmetic(q, k, v, mask, prefix_k, prefix_v)
        scale = self.mscale * self.mscale / math.sqrt(config.attention_scores_scalar or config.head_size)
        groups = config.n_query_groups
        out = masked_gated_prefix_attention(
            q, _one_head_per_group(k, config.n_head, groups), _one_head_per_group(v, config.n_head, groups),
            prefix_k, prefix_v, self.gating_factor.reshape(-1), attention_mask=mask, gate_activation="identity",
            softmax_scale=scale, causal=True, backend=self.fused_backend,
        )
        return out.transpose(1, 2)

    def _litgpt_arithmetic(self, q, k, v, mask, prefix_k, prefix_v) -> torch.Tensor:
        """litgpt's two base attention calls (softcapping, which the op does not compute),
        over prefix keys and values of this forward, repeated as litgpt repeats them."""
        y = BaseAttention.scaled_dot_product_attention(self, q, k, v, mask)
        q_per_kv = self.config.n_head // self.config.n_query_groups
        ak, av = (x[None].repeat_interleave(q_per_kv, dim=1) if x.shape[0] != 1 else x[None]
                  for x in (prefix_k, prefix_v))
        amask = torch.ones(q.shape[2], ak.shape[2], dtype=torch.bool, device=q.device)
        return y + self.gating_factor * BaseAttention.scaled_dot_product_attention(self, q, ak, av, amask)

    def _fused_prefix(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values in `dtype`; without gradients (generation) kept while
        the prompt and the qkv parameters stay the same tensors at the same version."""
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            params = (self.adapter_wte.weight, *self.qkv.parameters())
            key = (dtype, self.fused_prefix_projection, *((id(p), p.data_ptr(), p._version) for p in params))
            cached = getattr(self, "_fused_prefix_cache", None)
            if cached is not None and cached[0] == key:
                return cached[1]
        prefix = tuple(x.to(dtype) for x in prefix_keys_values(self, self.fused_prefix_projection))
        if cacheable:
            self._fused_prefix_cache = (key, prefix)
        return prefix


class FusedAdapterAttention(_FusedPrefixAttention, AdapterAttention):
    """``litgpt.adapter.CausalSelfAttention`` with the fused prefix attention."""


class FusedAdapterV2Attention(_FusedPrefixAttention, AdapterV2Attention):
    """``litgpt.adapter_v2.CausalSelfAttention`` with the fused prefix attention."""


# The most derived class first: adapter_v2's attention subclasses adapter's.
_FUSED = {AdapterV2Attention: FusedAdapterV2Attention, AdapterAttention: FusedAdapterAttention}
_ORIGINAL = {fused: original for original, fused in _FUSED.items()}


def enable_fused_adapter(model: nn.Module, backend: str = "auto", prefix_projection: str = "litgpt") -> nn.Module:
    """Make the adapted layers of a litgpt adapter or adapter_v2 ``GPT`` run the fused op.

    Each layer from ``adapter_start_layer`` up then runs one `gated_prefix_attention`
    (identity gate, litgpt's per-head ``gating_factor``, litgpt's scale with its ``mscale``)
    in place of litgpt's two attention calls, in training and in generation with litgpt's
    KV cache; logits, gradients and greedy tokens match litgpt's own forward within
    floating-point tolerance (see the module docstring for the prefix cache litgpt keeps
    and this path does not). The mask litgpt passes (None in training: causal; a boolean
    slice of its cache mask in generation; a sliding-window mask) reaches the op as causal
    masking plus key padding where it is one; any other mask (a sliding window that bites)
    is computed exactly by two masked SDPA calls. Layers with attention logit softcapping
    (Gemma 2) keep litgpt's arithmetic, with a warning; litgpt 0.5 has no attention sinks.
    Parameter names, the state dict and litgpt's checkpoints do not change.

    Args:
        model: a ``litgpt.adapter.GPT`` or ``litgpt.adapter_v2.GPT`` (or a module holding one).
        backend: the op's backend: "auto" (the Triton kernels for CUDA tensors, two SDPA
            calls otherwise), "triton", "sdpa" or "eager".
        prefix_projection: "litgpt" (default) slices the prompt's qkv output as litgpt does,
            which gives litgpt's numbers for its checkpoints; "own" takes the prefix keys
            and values from the rows of the qkv projection that give the layer's own keys
            and values, as the paper projects the prompt (a different model: litgpt's
            checkpoints do not carry over).

    Returns:
        The same model, modified in place (idempotent; the options of the last call apply).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if prefix_projection not in PREFIX_PROJECTIONS:
        raise ValueError(f"prefix_projection must be one of {PREFIX_PROJECTIONS}, got {prefix_projection!r}")
    modules = [m for m in model.modules() if isinstance(m, AdapterAttention)]
    if not modules:
        raise ValueError("model has no litgpt adapter attention: build it with litgpt.adapter.GPT or "
                         "litgpt.adapter_v2.GPT")
    for module in modules:
        if type(module) not in _FUSED and type(module) not in _ORIGINAL:
            raise TypeError(f"model: {type(module).__qualname__} is not litgpt's adapter or adapter_v2 attention; "
                            "its forward may differ, so it is not fused")
    if any(m.config.attention_logit_softcapping is not None for m in modules):
        warnings.warn("fused litgpt adapter: attention logit softcapping is not computed by the fused op; those "
                      "layers keep litgpt's two attention calls (with prefix keys and values of each forward)",
                      stacklevel=2)
    for module in modules:
        module.__class__ = _FUSED.get(type(module), type(module))
        module.fused_backend = backend
        module.fused_prefix_projection = prefix_projection
        module._fused_prefix_cache = None
    return model


def disable_fused_adapter(model: nn.Module) -> nn.Module:
    """Undo `enable_fused_adapter`: the adapted layers run litgpt's own method again (with
    its ``adapter_kv_cache`` emptied, so that it starts from the current weights)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        original = _ORIGINAL.get(type(module))
        if original is not None:
            module.__class__ = original
            for name in ("fused_backend", "fused_prefix_projection", "_fused_prefix_cache"):
                module.__dict__.pop(name, None)
            if hasattr(module, "adapter_kv_cache"):
                module.adapter_kv_cache = None
    return model
