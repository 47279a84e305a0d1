"""LLaMA-Adapter V2's bias, scale and norm tuning folded into the base's weights, for a model
that serves one such adapter (no vLLM import here).

A tuned linear layer computes s * (W x + b) ("output" scale), W (s * x) + b ("input") or
W x + b ("none"). Each is exactly a plain linear layer with a bias:

    output: W' = s[:, None] * W, b' = s * b        input: W' = W * s[None, :], b' = b

(the package's own `tuned_linear` computes the same folded product), and norm tuning is the
tuned RMSNorm weights in place of the base's. vLLM's Llama takes biases in its attention
(``attention_bias``: q, k, v and o) and MLP (``mlp_bias``: gate, up and down) projections,
so a model folder that serves such an adapter turns those on; the layers the adapter does not
tune get zero biases. The output head has no bias in vLLM's Llama (and may share its weight
with the embeddings), so an adapter that tunes it is refused.

Because the folded weights are the adapter's own, an adapter with V2's tuning is served as
the model's only adapter, not chosen per request over a shared base.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping

import torch

# Tuned linear layers (the package's names) -> (Hugging Face module, config flag of its bias).
FOLDABLE = {"wq": ("self_attn.q_proj", "attention_bias"), "wk": ("self_attn.k_proj", "attention_bias"),
            "wv": ("self_attn.v_proj", "attention_bias"), "wo": ("self_attn.o_proj", "attention_bias"),
            "w1": ("mlp.gate_proj", "mlp_bias"), "w3": ("mlp.up_proj", "mlp_bias"),
            "w2": ("mlp.down_proj", "mlp_bias")}
_MODULE_PART = {"self_attn": "attention", "mlp": "feed_forward"}
# The norms, Hugging Face name -> the package's.
_NORMS = {"input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def has_tuning(settings: Mapping) -> bool:
    """Whether an adapter's settings (its config) record V2's bias, scale or norm tuning."""
    return bool(settings.get("bias_tuning")) or bool(settings.get("norm_tuning"))


def check_foldable(settings: Mapping, adapter: str | os.PathLike) -> None:
    """A ValueError naming `adapter` where its tuning cannot be folded into vLLM's Llama."""
    unknown = sorted(set(settings.get("bias_tuning") or ()) - set(FOLDABLE))
    if unknown:
        raise ValueError(f"adapter {adapter}: V2's bias and scale on {unknown} cannot be folded into vLLM's Llama "
                         f"(its output head has no bias); only {sorted(FOLDABLE)} can")


def tuning_config(settings: Mapping) -> dict[str, bool]:
    """The config.json flags that give vLLM's Llama the biases the folded adapter needs."""
    return {FOLDABLE[name][1]: True for name in settings.get("bias_tuning") or ()}


def fold_tuning(weights: Iterable[tuple[str, torch.Tensor]], state: Mapping[str, torch.Tensor], settings: Mapping,
                num_layers: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's Hugging Face-named `weights` with the adapter's tuning (`state`, the
    package's names) folded in as the package computes it (the scale in the weight's dtype),
    then the biases that `tuning_config` turns on: the tuned layers' own, zeros for the others."""
    placement = settings.get("scale_tuning", "output")
    tuned = {FOLDABLE[name][0]: name for name in settings.get("bias_tuning") or ()}
    flags = set(tuning_config(settings))
    biased = {module for module, flag in FOLDABLE.values() if flag in flags}
    biases: dict[str, torch.Tensor] = {}
    for name, weight in weights:
        if name == "model.norm.weight" and "norm.weight" in state:
            weight = state["norm.weight"].to(weight.dtype)
        elif name.startswith("model.layers.") and name.endswith(".weight"):
            _, _, layer, rest = name.split(".", 3)
            module = rest.removesuffix(".weight")
            norm = f"layers.{layer}.{_NORMS[module]}.weight" if module in _NORMS else None
            if norm in state:
                weight = state[norm].to(weight.dtype)
            elif module in biased:
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                if module in tuned:
                    weight, bias = _folded(weight, state, f"layers.{layer}.{_MODULE_PART[module.split('.')[0]]}."
                                                         f"{tuned[module]}.", placement)
                biases[f"model.layers.{layer}.{module}.bias"] = bias
        yield name, weight
    missing = {f"model.layers.{i}.{module}.bias" for i in range(num_layers) for module in biased} - set(biases)
    if missing:
        raise ValueError(f"the base's weights lack the weight of {sorted(missing)[0]}: the adapter is for another base")
    yield from biases.items()


def _folded(weight: torch.Tensor, state: Mapping[str, torch.Tensor], own: str,
            placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    bias = state[own + "tuned_bias"].to(weight.device, weight.dtype)
    if placement == "none":
        return weight, bias
    s = state[own + "tuned_scale"].to(weight.device, weight.dtype)
    return (weight * s[:, None], bias * s) if placement == "output" else (weight * s, bias)


__all__ = ["FOLDABLE", "check_foldable", "fold_tuning", "has_tuning", "tuning_config"]
