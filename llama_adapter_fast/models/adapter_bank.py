"""Several adapters over one base in one batch: each sample names its adapter, or none.

An adaption prompt cannot be merged into the base's weights, but it need not be: each
adapted layer's prefix keys and values, and its gate, are all an adapter adds. A batch that
mixes adapters stacks them per sample, (B, Hkv, P, D) prefixes and (B, Hq) gates, and the
fused op takes both; a sample without an adapter gets a gate of zero, which gives the base's
attention exactly. The base runs once for the whole batch.

    bank = AdapterBank(model)
    bank.load("math", "math.safetensors")
    bank.load("chat", other_model.adapter_state_dict())
    generate(model, prompts, adapters=bank, adapter_names=["math", None, "chat"])

Adapters in a bank have the model's adapter settings (layers, prompt length, gate shape and
activation); V2's bias, scale and norm tuning change the base's own weights, so a model
with them is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from llama_adapter_fast.models.llama import LLaMAAdapter


class AdapterBank:
    """Named adapters for one `LLaMAAdapter`, loaded and unloaded at run time, turned into
    the per-sample prefixes and gates of a mixed batch."""

    def __init__(self, model: LLaMAAdapter):
        if not isinstance(model, LLaMAAdapter):
            raise TypeError(f"model must be a LLaMAAdapter, got {type(model).__name__}")
        args = model.args
        if args.bias_tuning or args.norm_tuning:  # scale tuning comes only with bias tuning
            raise ValueError("model: V2's bias, scale and norm tuning change the base's weights, which one batch "
                             "shares; an AdapterBank takes models with prompts and gates only")
        if args.adapter_layers == 0:
            raise ValueError("model: an AdapterBank needs a model with adapter layers (adapter_layers = 0)")
        self.model = model
        self._adapters: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        """The adapters loaded, in loading order."""
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def load(self, name: str, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike) -> None:
        """Add (or replace) adapter `name`: a state dict or any file `LLaMAAdapter.load_adapter`
        reads, checked the same way (settings, names, shapes, finite values). The model's own
        adapter is left as it was, and a refused adapter changes nothing."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        own = dict(self.model.adapter_parameters())
        saved = {key: p.detach().clone() for key, p in own.items()}
        try:
            self.model.load_adapter(state_dict_or_path)
            state = {key: p.detach().clone() for key, p in own.items()}
        finally:
            with torch.no_grad():
                for key, p in own.items():
                    p.copy_(saved[key])
        self._adapters[name] = state

    def unload(self, name: str) -> None:
        """Remove adapter `name` (a KeyError naming it, and the loaded ones, if absent)."""
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {self.names})")
        del self._adapters[name]

    @torch.no_grad()
    def prefixes(self, adapter_names: Sequence[str | None],
                 dtype: torch.dtype | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
        """Per layer: None for a layer without adapter, else (prefix_k, prefix_v, gate) of
        the batch, (B, Hkv, P, D) twice and (B, Hq), sample b with adapter
        `adapter_names[b]` (None: the base alone, a zero gate). Each adapter's prefix is
        computed once, through the frozen projections, whatever the number of its samples."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise ValueError("adapter_names must be a non-empty list of adapter names or None, one per sample")
        unknown = sorted({n for n in adapter_names if n is not None and n not in self._adapters}, key=str)
        if unknown:
            raise ValueError(f"adapter_names: {unknown} not loaded in the AdapterBank (loaded: {self.names})")
        dtype = dtype or self.model.tok_embeddings.weight.dtype
        used = list(dict.fromkeys(n for n in adapter_names if n is not None))
        slot = [used.index(n) + 1 if n is not None else 0 for n in adapter_names]  # 0: no adapter
        index = torch.tensor(slot, device=self.model.tok_embeddings.weight.device)
        out = []
        for i, layer in enumerate(self.model.layers):
            attention = layer.attention
            if not attention.use_adapter:
                out.append(None)
                continue
            key = f"layers.{i}.attention."
            pairs = [attention.adapter_prefix(prompt=self._adapters[n][key + "adapter_prompt"]) for n in used]
            gates = [self._adapters[n][key + "gate"].float().expand(attention.n_heads) for n in used]
            # Slot 0, the base: any finite prefix (zeros) under a zero gate adds exactly nothing.
            zero = index.new_zeros((attention.n_kv_heads, self.model.args.adapter_len, attention.head_dim),
                                   dtype=dtype)
            prefix_k = torch.stack([zero, *(k.to(dtype) for k, _ in pairs)])
            prefix_v = torch.stack([zero, *(v.to(dtype) for _, v in pairs)])
            gate = torch.stack([zero.new_zeros(attention.n_heads, dtype=torch.float32), *gates])
            out.append((prefix_k[index], prefix_v[index], gate[index]))
        return out


__all__ = ["AdapterBank"]
