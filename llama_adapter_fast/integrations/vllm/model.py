"""LLaMA-Adapter inside vLLM's Llama: the prefix part added in the adapted layers.

vLLM's ``LlamaAttention`` computes q, k, v with one fused projection, rotates q and k and
runs its paged attention over the words. The adapted layers add, between that attention
and o_proj, the prefix part of the op, for every token of the step at once:

    out += act(gate[h]) * softmax(s * q[t, h] . prefix_k[g]) @ prefix_v[g]

with the queries rotated and the prefix keys not (as in the paper's model), softmax
statistics in float32. With a zero gate the output is vLLM's own attention output, bit for
bit.

Which adapter a token uses:
- the model folder's config.json (``llama_adapter``) may name a default adapter file, whose
  prefix is computed once, when the weights are loaded, through the layer's own frozen k and
  v rows; without one, the default is the base (a zero gate);
- with vLLM's LoRA enabled, a request that names an adapter served as a LoRA adapter (see
  `folder.lora_folder` and `hooks`) gets that adapter: each step gathers every token's
  prefix and gate by its LoRA slot, each adapter's prefix computed once per layer.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from llama_adapter_fast.integrations.vllm import check_vllm, hooks
from llama_adapter_fast.integrations.vllm.fold import fold_tuning, has_tuning
from llama_adapter_fast.integrations.vllm.folder import (
    ADAPTER_FILE,
    check_same_settings,
    check_servable,
    write_lora_folder,
)
from llama_adapter_fast.models.formats.native import read_adapter, read_adapter_config, with_own_names
from llama_adapter_fast.ops.reference import activate_gate

check_vllm()  # the classes below subclass this vLLM's model code


class AdapterLlamaAttention(LlamaAttention):
    """vLLM's Llama attention with the adapter's prefix part in the adapted layers."""

    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        settings = config.llama_adapter
        self.gate_activation = settings["gate_activation"]
        self.adapted = self.layer_idx >= config.num_hidden_layers - settings["adapter_layers"]
        if self.adapted:
            P = settings["adapter_len"]
            # The default adapter (zeros: the base), of this rank's heads: keys and values
            # (Hkv, P, D), act(gate) of its query heads.
            self.register_buffer("prefix_k", torch.zeros(self.num_kv_heads, P, self.head_dim), persistent=False)
            self.register_buffer("prefix_v", torch.zeros(self.num_kv_heads, P, self.head_dim), persistent=False)
            self.register_buffer("gate_act", torch.zeros(self.num_heads), persistent=False)
            self.by_lora_id: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            # The slots' prefixes stacked for the last slot layout: (layout, (keys, values, gates)).
            self.stacked: tuple | None = None
            self.lora_state: dict = {}  # shared with the model: the LoRA id of each slot

    def rank_prefix(self, qkv: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's prefix keys and values from the prompt's projection `qkv` (P, q + 2 kv)
        and act(gate) of its query heads."""
        _, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        act = activate_gate(gate.float(), self.gate_activation).reshape(-1).expand(self.total_num_heads)
        rank = self._tp_rank()
        return (k.view(-1, self.num_kv_heads, self.head_dim).transpose(0, 1).contiguous(),
                v.view(-1, self.num_kv_heads, self.head_dim).transpose(0, 1).contiguous(),
                act[self.num_heads * rank:self.num_heads * (rank + 1)].to(qkv.device).contiguous())

    @torch.no_grad()
    def set_default(self, prompt: torch.Tensor, gate: torch.Tensor) -> None:
        """The default adapter, through the loaded weight itself (vLLM's CPU backend prepares
        the layer's own kernels only after loading)."""
        layer = getattr(self.qkv_proj, "base_layer", self.qkv_proj)
        weight = layer.weight
        qkv = torch.nn.functional.linear(prompt.to(weight.device, weight.dtype), weight, getattr(layer, "bias", None))
        self.prefix_k, self.prefix_v, self.gate_act = self.rank_prefix(qkv, gate)

    def _tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        if self.adapted:
            out = out + self.prefix_part(q).to(out.dtype)
        output, _ = self.o_proj(out)
        return output

    def token_prefixes(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Per-token prefix keys, values and gates by LoRA slot, or None without LoRA."""
        wrapper = getattr(self.o_proj, "punica_wrapper", None)
        slot_ids = self.lora_state.get("slots")
        if wrapper is None or slot_ids is None:
            return None
        layout = tuple(slot_ids)
        if self.stacked is None or self.stacked[0] != layout:  # restacked only when the slots change
            entries = [self.adapter_of(i) for i in layout]  # a slot without LoRA: the default
            self.stacked = (layout, tuple(torch.stack([e[j] for e in entries] + [default])
                                          for j, default in enumerate((self.prefix_k, self.prefix_v, self.gate_act))))
        keys, values, gates = self.stacked[1]
        slots = wrapper.token_lora_indices[:n].long()
        if slots.shape[0] < n:  # padded steps: the padding rows take the default
            slots = torch.cat([slots, slots.new_full((n - slots.shape[0],), -1)])
        slots = torch.where(slots < 0, len(layout), slots)
        return keys[slots], values[slots], gates[slots]

    def adapter_of(self, lora_id: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if lora_id is None or lora_id not in hooks.LORA_FOLDERS:
            return self.prefix_k, self.prefix_v, self.gate_act
        if lora_id not in self.by_lora_id:
            state = self.lora_state["read"](lora_id)
            key = f"layers.{self.layer_idx}.attention."
            layer = getattr(self.qkv_proj, "base_layer", self.qkv_proj)  # without the (zero) LoRA
            prompt = state[key + "adapter_prompt"].to(self.prefix_k.device, self.prefix_k.dtype)
            qkv, _ = layer(prompt)
            self.by_lora_id[lora_id] = self.rank_prefix(qkv, state[key + "gate"])
        return self.by_lora_id[lora_id]

    def prefix_part(self, q: torch.Tensor) -> torch.Tensor:
        """act(gate) * softmax(s q prefix_k^T) prefix_v for every token (N, Hq * D), float32."""
        n = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        queries = q.view(n, self.num_kv_heads, group, self.head_dim).float()
        per_token = self.token_prefixes(n)
        if per_token is None:
            scores = torch.einsum("ngqd,gpd->ngqp", queries, self.prefix_k.float()) * self.scaling
            out = torch.einsum("ngqp,gpd->ngqd", scores.softmax(-1), self.prefix_v.float())
            gate = self.gate_act.view(1, self.num_kv_heads, group, 1)
        else:
            keys, values, gates = per_token
            scores = torch.einsum("ngqd,ngpd->ngqp", queries, keys.float()) * self.scaling
            out = torch.einsum("ngqp,ngpd->ngqd", scores.softmax(-1), values.float())
            gate = gates.view(n, self.num_kv_heads, group, 1)
        return (out * gate).reshape(n, -1)


class LlamaAdapterForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM whose top layers carry a LLaMA-Adapter (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        settings = getattr(config, "llama_adapter", None)
        if not isinstance(settings, dict) or not ("path" in settings or "adapter_layers" in settings):
            raise ValueError("config.json: a LlamaAdapterForCausalLM folder holds llama_adapter, the adapter's "
                             "settings or file (llama-adapter-fast serve writes it)")
        if "path" in settings:
            settings = {**read_adapter_config(settings["path"]), **settings}
        config.llama_adapter = settings
        layer = functools.partial(LlamaDecoderLayer, attn_layer_type=AdapterLlamaAttention)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)
        hooks.install()
        self._lora_state = {"read": self._read_lora_adapter}
        self._lora_files: dict[int, dict[str, torch.Tensor]] = {}
        for attention in self.adapted_attentions():
            attention.lora_state = self._lora_state

    def adapted_attentions(self) -> list[AdapterLlamaAttention]:
        return [layer.self_attn for layer in self.model.layers
                if isinstance(getattr(layer, "self_attn", None), AdapterLlamaAttention) and layer.self_attn.adapted]

    def llama_adapter_slots(self, slot_ids: list[int | None]) -> None:
        """The LoRA id of each slot, after each of vLLM's mapping updates (see `hooks`)."""
        self._lora_state["slots"] = slot_ids

    def llama_adapter_lora_path(self, lora_id: int, path: str) -> str:
        """The LoRA folder of a request's adapter, checked against this model (called by
        `hooks` before vLLM loads it): a folder of `lora_folder`, or an adapter file, put
        into such a folder here. What this LoRA id held before is forgotten."""
        source = Path(path)
        adapter = source / ADAPTER_FILE if source.is_dir() else source
        if not adapter.is_file():
            raise ValueError(f"lora_path: {path} is neither an adapter file nor a folder holding {ADAPTER_FILE}")
        if has_tuning(self.config.llama_adapter):
            raise ValueError(f"lora_path: {path}: this model's weights carry its own adapter's V2 tuning "
                             f"({self.config.llama_adapter['path']}), so it serves no other adapter")
        config = self.config.to_dict()
        check_servable(config, adapter)  # the base's width and depth; prompts and gates only
        check_same_settings(self.config.llama_adapter, read_adapter_config(adapter), adapter)
        if not source.is_dir():
            source = write_lora_folder(config, adapter, tempfile.mkdtemp(prefix="llama-adapter-lora-"))
        self._lora_files.pop(lora_id, None)
        for attention in self.adapted_attentions():
            attention.by_lora_id.pop(lora_id, None)
            attention.stacked = None
        return str(source)

    def _read_lora_adapter(self, lora_id: int) -> dict[str, torch.Tensor]:
        if lora_id not in self._lora_files:
            path = Path(hooks.LORA_FOLDERS[lora_id]) / ADAPTER_FILE
            settings = self.config.llama_adapter
            check_same_settings(settings, read_adapter_config(path), path)
            self._lora_files[lora_id] = with_own_names(read_adapter(path).state, settings["adapter_layers"])
        return self._lora_files[lora_id]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        settings = self.config.llama_adapter
        state = with_own_names(read_adapter(settings["path"]).state, settings["adapter_layers"]) \
            if "path" in settings else None
        if state is not None and has_tuning(settings):  # V2's tuning folded into the weights (see fold)
            weights = fold_tuning(weights, state, settings, self.config.num_hidden_layers)
        loaded = super().load_weights(weights)
        for attention in self.adapted_attentions():
            key = f"layers.{attention.layer_idx}.attention."
            if state is not None:
                attention.set_default(state[key + "adapter_prompt"], state[key + "gate"])
            else:
                attention.set_default(torch.zeros(settings["adapter_len"], self.config.hidden_size),
                                      torch.zeros(()))
        return loaded
