"""LLaMA-Adapter inside vLLM's Llama: the prefix part added in the adapted layers.

vLLM's ``LlamaAttention`` computes q, k, v with one fused projection, rotates q and k and
runs its paged attention over the words. The adapted layers add, between that attention
and o_proj, the prefix part of the op, for every token of the step at once:

    out += act(gate[h]) * softmax(s * q[t, h] . prefix_k[g]) @ prefix_v[g]

with the queries rotated and the prefix keys not (as in the paper's model), softmax
statistics in float32. The prefix keys and values are computed once, when the weights are
loaded, through the layer's own (frozen) k and v projections. With a zero gate the output
is vLLM's own attention output, bit for bit.

The adapter comes from the model folder's config.json: ``llama_adapter`` holds the path of
an adapter file of this package (or anything `llama-adapter-fast convert` wrote).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from llama_adapter_fast.integrations.vllm import check_vllm
from llama_adapter_fast.models.formats.native import read_adapter, read_adapter_config, with_own_names
from llama_adapter_fast.ops.reference import activate_gate

check_vllm()  # the classes below subclass this vLLM's model code


class AdapterLlamaAttention(LlamaAttention):
    """vLLM's Llama attention with the adapter's prefix part in the adapted layers."""

    def __init__(self, config, *args, prefix: str = "", **kwargs):
        super().__init__(config, *args, prefix=prefix, **kwargs)
        self.layer_idx = extract_layer_index(prefix)
        settings = config.llama_adapter
        self.adapted = self.layer_idx >= config.num_hidden_layers - settings["adapter_layers"]
        if self.adapted:
            P = settings["adapter_len"]
            # Filled by LlamaAdapterForCausalLM.load_weights: keys and values (Hkv, P, D) of
            # this rank's heads, act(gate) of its query heads.
            self.register_buffer("prefix_k", torch.zeros(self.num_kv_heads, P, self.head_dim), persistent=False)
            self.register_buffer("prefix_v", torch.zeros(self.num_kv_heads, P, self.head_dim), persistent=False)
            self.register_buffer("gate_act", torch.zeros(self.num_heads), persistent=False)

    @torch.no_grad()
    def set_prefix(self, prompt: torch.Tensor, gate: torch.Tensor, gate_activation: str) -> None:
        """The prefix of `prompt` (P, dim) through this layer's k and v projections, and act(gate)."""
        # The loaded weight itself (this rank's rows): the layer's own kernels are prepared
        # only after loading (vLLM's CPU backend repacks them then).
        weight, bias = self.qkv_proj.weight, getattr(self.qkv_proj, "bias", None)
        qkv = torch.nn.functional.linear(prompt.to(weight.device, weight.dtype), weight, bias)
        _, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        self.prefix_k = k.view(-1, self.num_kv_heads, self.head_dim).transpose(0, 1).contiguous()
        self.prefix_v = v.view(-1, self.num_kv_heads, self.head_dim).transpose(0, 1).contiguous()
        act = activate_gate(gate.float(), gate_activation).reshape(-1).expand(self.total_num_heads)
        rank_heads = slice(self.num_heads * self._tp_rank(), self.num_heads * (self._tp_rank() + 1))
        self.gate_act = act[rank_heads].to(self.prefix_k.device).contiguous()

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

    def prefix_part(self, q: torch.Tensor) -> torch.Tensor:
        """act(gate) * softmax(s q prefix_k^T) prefix_v for every token (N, Hq * D), float32."""
        n = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        queries = q.view(n, self.num_kv_heads, group, self.head_dim).float()
        scores = torch.einsum("ngqd,gpd->ngqp", queries, self.prefix_k.float()) * self.scaling
        out = torch.einsum("ngqp,gpd->ngqd", scores.softmax(-1), self.prefix_v.float())
        return (out * self.gate_act.view(self.num_kv_heads, group, 1)).reshape(n, -1)


class LlamaAdapterForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM whose top layers carry a LLaMA-Adapter."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        settings = getattr(config, "llama_adapter", None)
        if not isinstance(settings, dict) or "path" not in settings:
            raise ValueError("config.json: a LlamaAdapterForCausalLM folder names its adapter file in "
                             "llama_adapter.path (llama-adapter-fast serve writes it)")
        config.llama_adapter = {**read_adapter_config(settings["path"]), **settings}
        layer = functools.partial(LlamaDecoderLayer, attn_layer_type=AdapterLlamaAttention)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        settings = self.config.llama_adapter
        state = with_own_names(read_adapter(settings["path"]).state, settings["adapter_layers"])
        for layer in self.model.layers:
            attention = getattr(layer, "self_attn", None)
            if attention is None or not getattr(attention, "adapted", False):
                continue
            key = f"layers.{attention.layer_idx}.attention."
            attention.set_prefix(state[key + "adapter_prompt"], state[key + "gate"], settings["gate_activation"])
        return loaded
