"""LLaMA with LLaMA-Adapter, in one file.

The architecture is Meta's LLaMA (RMSNorm, rotary position embeddings with an optional
Llama-3 style frequency scaling, SwiGLU feed-forward, grouped-query attention). The adapter
is the one of Zhang et al. (2023): in each of the top `adapter_layers` layers a learned
adaption prompt of `adapter_len` vectors of the model width is projected by that layer's
frozen wk and wv into prefix keys and values (without rotary embedding), every query attends
to it with a softmax of its own, and the result is scaled by a gate that starts at zero.
That attention is one call of `gated_prefix_attention`, the fused op of this package.

Weight names follow Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...); the
checkpoint formats are in `formats/hf_meta.py`, the adapter files in `formats/native.py`.

    model = LLaMAAdapter.from_hf("path/to/llama-hf", adapter_len=10, adapter_layers=30)
    logits = model(tokens)                  # (B, T, vocab)
    model.adapter_state_dict()              # what training changes: prompts and gates
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llama_adapter_fast.models import quantized
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.formats import hf_meta, native
from llama_adapter_fast.models.rope import apply_rotary, rope_cos_sin, rope_inv_freq
from llama_adapter_fast.ops import gated_prefix_attention, gated_prefix_attention_varlen
from llama_adapter_fast.ops.reference import allowed_keys
from llama_adapter_fast.ops.varlen import packed_positions, varlen_attention

# ----------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 whatever the input dtype, as both reference implementations do.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Causal attention for the layers without adapter, with the op's conventions: the mask
    is aligned to the bottom right, and a query with no allowed key gets 0 rather than NaN
    (left-padded prompts have such rows; a NaN there would leak through later layers)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is None and (T == S or T == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=T == S and T > 1, enable_gqa=gqa)
    allowed = allowed_keys(T, S, True, key_padding_mask, q.device)
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, use_adapter: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = args.linear("wq", args.dim, args.n_heads * self.head_dim)
        self.wk = args.linear("wk", args.dim, args.n_kv_heads * self.head_dim)
        self.wv = args.linear("wv", args.dim, args.n_kv_heads * self.head_dim)
        self.wo = args.linear("wo", args.n_heads * self.head_dim, args.dim)
        self.use_adapter = use_adapter
        self.takes_prompt_offset = use_adapter  # the multi-modal adapter's early fusion turns it off up top
        self.gate_activation, self.prefix_projection = args.gate_activation, args.prefix_projection
        self.backend = args.attention_backend
        if use_adapter:
            # Trainable parameters stay float32 whatever the base dtype (they are small, and
            # the optimizer wants full precision); they are cast where they meet the base.
            self.adapter_prompt = nn.Parameter(torch.empty(args.adapter_len, args.dim, dtype=torch.float32))
            self.gate = nn.Parameter(torch.zeros(() if args.scalar_gate else args.n_heads, dtype=torch.float32))

    def adapter_prefix(self, prompt_offset: torch.Tensor | None = None,
                       prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values (Hkv, P, D): the prompt (this layer's own, or `prompt`,
        another adapter's) through the frozen wk and wv, without rotary embedding (the prompt
        has no position).

        With `prompt_offset` (B, dim), row b is added to every position of the prompt (the
        multi-modal LLaMA-Adapter's P_l + Repeat(I_p)) and the prefix is per sample, (B, Hkv, P, D).
        """
        prompt = self.adapter_prompt if prompt is None else prompt
        if prompt_offset is not None:
            prompt = prompt + prompt_offset[:, None, :].to(prompt.dtype)
        if not torch.is_autocast_enabled(prompt.device.type):  # a quantized layer names its compute dtype
            prompt = prompt.to(getattr(self.wk, "compute_dtype", None) or self.wk.weight.dtype)
        if self.prefix_projection == "litgpt":  # see ModelArgs.prefix_projection
            per_group = self.n_heads // self.n_kv_heads
            qkv = torch.cat([self.wq(prompt), self.wk(prompt), self.wv(prompt)], -1)
            qkv = qkv.unflatten(-1, (self.n_kv_heads, per_group + 2, self.head_dim)).transpose(-4, -3)
            return qkv[..., per_group, :], qkv[..., per_group + 1, :]
        heads = (self.n_kv_heads, self.head_dim)
        return tuple(w(prompt).unflatten(-1, heads).transpose(-3, -2) for w in (self.wk, self.wv))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        packing: tuple[torch.Tensor, int] | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rotary(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if packing is not None:
            return self.wo(self._packed(q[0], k[0], v[0], *packing, prefix).reshape(B, T, -1))
        # (B, T, H, D) -> (B, H, T, D) views: the op accepts any strides, so no copy here.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            cache_k, cache_v = cache
            cache_k[:, :, start:start + T] = k
            cache_v[:, :, start:start + T] = v
            k, v = cache_k[:, :, :start + T], cache_v[:, :, :start + T]
        if self.use_adapter:
            # A prefix may bring its own gate: (B, Hq) for a batch that mixes adapters.
            prefix_k, prefix_v, *gate = prefix if prefix is not None else self.adapter_prefix()
            out = gated_prefix_attention(
                q, k, v, prefix_k, prefix_v, gate[0] if gate else self.gate, causal=True,
                gate_activation=self.gate_activation, key_padding_mask=key_padding_mask, backend=self.backend,
            )
        else:
            out = plain_attention(q, k, v, key_padding_mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int, prefix: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Attention over packed records ((L, H, D) each): no record sees another. `prefix`
        may be one per record, (N, Hkv, P, D)."""
        if not self.use_adapter:
            return varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=self.backend)
        prefix_k, prefix_v = prefix if prefix is not None else self.adapter_prefix()
        return gated_prefix_attention_varlen(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, prefix_k, prefix_v, self.gate, causal=True,
            gate_activation=self.gate_activation, backend=self.backend,
        )


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden_dim = args.dim, args.ffn_hidden_dim
        self.w1 = args.linear("w1", dim, hidden_dim)
        self.w2 = args.linear("w2", hidden_dim, dim)
        self.w3 = args.linear("w3", dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, use_adapter=layer_id >= args.n_layers - args.adapter_layers)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, key_padding_mask, cache=None, start=0, prefix=None, packing=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, key_padding_mask, cache, start, prefix, packing)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Keys and values of every layer for incremental decoding, and the adapter prefixes.

    The prefix keys and values depend only on the weights (and on `prompt_offset`, the
    per-sample image feature of the multi-modal adapter), so they are computed once when the
    cache is made and reused at every decoding step. `prefixes` (per layer, None or a
    per-sample (prefix_k, prefix_v, gate)) replaces them for a batch that mixes adapters
    (`AdapterBank.prefixes`).
    """

    def __init__(self, model: LLaMAAdapter, batch_size: int, max_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 prompt_offset: torch.Tensor | None = None, prefixes: list | None = None):
        args = model.args
        model.check_prompt_offset(prompt_offset, batch_size)
        weight = model.tok_embeddings.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len = max_len
        self.length = 0
        if prefixes is not None:  # each layer's (prefix_k, prefix_v, gate) of a mixed batch (AdapterBank)
            self.prefixes = prefixes
            return
        with torch.no_grad():
            self.prefixes = [
                tuple(t.to(dtype) for t in layer.attention.adapter_prefix(
                    prompt_offset if layer.attention.takes_prompt_offset else None))
                if layer.attention.use_adapter else None for layer in model.layers
            ]


# ----------------------------------------------------------------------------------------
# The model


class LLaMAAdapter(nn.Module):
    """LLaMA with adaption prompts and zero-initialized gates in its top `adapter_layers`.

    The base weights are frozen (requires_grad False); the prompts (N(0, 1) at start, as in
    the original) and the gates (zero at start, so the model starts as the base LLaMA) train.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be a ModelArgs, got {type(args).__name__}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = args.linear("output", args.dim, args.vocab_size)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}
        # Keep only each block's input in training and recompute the block in the backward:
        # the frozen blocks' activations are most of a step's memory (TrainConfig's option).
        self.activation_checkpointing = False
        self.reset_parameters()
        self.freeze_base()

    # -- parameters -------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """A fresh random model: base weights N(0, 0.02) (output projections scaled down
        with depth, as GPT-2 does), unit norms, then `reset_adapter`."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif not self._is_adapter_name(name):
                scale = 1 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
        self.reset_adapter()

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """Prompts N(0, 1) (the original's nn.Embedding default), gates zero; V2's tuned
        biases zero and scales one (the norms keep their weights)."""
        with torch.no_grad():
            for module in self.modules():
                if hasattr(module, "reset_tuning") and module.tuned_bias.device.type != "meta":
                    module.reset_tuning()
            for layer in self.adapter_layers():
                if layer.adapter_prompt.device.type == "meta":
                    continue
                if generator is None:
                    layer.adapter_prompt.normal_()
                else:
                    layer.adapter_prompt.copy_(torch.randn(layer.adapter_prompt.shape, generator=generator))
                layer.gate.zero_()

    @staticmethod
    def _is_adapter_name(name: str) -> bool:
        """The parameters a base checkpoint does not hold: prompts, gates, V2's biases and scales."""
        return name.endswith((".adapter_prompt", ".gate", ".tuned_bias", ".tuned_scale"))

    def is_trainable_name(self, name: str) -> bool:
        """The parameters that train: the adapter's, and the norms' with norm_tuning."""
        return self._is_adapter_name(name) or (self.args.norm_tuning and name.endswith("norm.weight"))

    def adapter_layers(self) -> list[Attention]:
        """The attention modules that carry an adapter (the top `adapter_layers`)."""
        return [layer.attention for layer in self.layers if layer.attention.use_adapter]

    def freeze_base(self) -> None:
        """Only the prompts and gates train (and V2's biases, scales and norms where enabled)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if self.is_trainable_name(n)]

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for _, p in self.adapter_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only: layers.N.attention.adapter_prompt (P, dim) and
        layers.N.attention.gate ((n_heads,) or ()); with V2's tuning, <linear>.tuned_bias and
        <linear>.tuned_scale and, with norm_tuning, the norms' weights."""
        return {n: p.detach() for n, p in self.adapter_parameters()}

    def load_adapter(self, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike | native.AdapterSource,
                     strict: bool = True) -> None:
        """Load adapter weights from a dict or any adapter source `native.read_adapter` reads (or has read); a
        file recording another gate activation, prefix projection or scale placement is refused."""
        source = "state_dict"
        if isinstance(state_dict_or_path, (str, os.PathLike, native.AdapterSource)):
            source = str(getattr(state_dict_or_path, "path", state_dict_or_path))
            state = native.read_adapter_file(state_dict_or_path, model_config=self.args.adapter_config())
        elif isinstance(state_dict_or_path, Mapping):
            state = dict(state_dict_or_path)
        else:
            raise TypeError(f"load_adapter takes a state dict or a path, got {type(state_dict_or_path).__name__}")
        state = native.with_own_names(state, self.args.adapter_layers,
                                          self.norm.weight if self.args.norm_tuning else None)
        args = self.args
        described = (f"adapter_layers={args.adapter_layers}, adapter_len={args.adapter_len}, scalar_gate="
                     f"{args.scalar_gate}, bias_tuning={list(args.bias_tuning)}, scale_tuning={args.scale_tuning}, "
                     f"norm_tuning={args.norm_tuning}")
        native.copy_adapter_state(dict(self.adapter_parameters()), state, source, described, strict)

    def save_adapter(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the adapter weights (float32) and the adapter config to a .safetensors file,
        atomically. `tensors` replaces the module's own (a state dict gathered from a sharded
        model)."""
        native.write_adapter_file(path, tensors if tensors is not None else self.adapter_state_dict(),
                                      self.args.adapter_config(), metadata)

    # -- forward ------------------------------------------------------------------------

    def _inv_freq_for(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        return self._inv_freq_on[device]

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        prompt_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T).

        Args:
            positions: rotary positions (T,) or (B, T); default 0..T-1 after what `cache` holds.
            key_padding_mask: (B, S) bool, True for real tokens, where S counts every key the
                queries see (the cached ones too). Not needed for right padding in training.
            cache: a KVCache: the new keys and values are appended to it.
            last_only: return the logits of the last position only, (B, 1, vocab).
            cu_seqlens, max_seqlen: packed records without padding (see `data.collate_packed`):
                tokens (1, L) hold the records one after another, record i at positions
                cu_seqlens[i] .. cu_seqlens[i + 1] ((N + 1,) int32), the longest max_seqlen
                long; no record attends to another, and the rotary positions restart at 0
                for each record unless `positions` gives them.
            prompt_offset: (B, dim), added to every position of every adaption prompt, sample
                by sample (the multi-modal adapter's projected image feature): each adapted
                layer computes its per-sample prefix (B, Hkv, P, D) once for the whole forward.
                With a cache, give it to the KVCache instead. With packed records, (N, dim):
                one row per record.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor of shape (B, T), got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        B, T = tokens.shape
        packing = None
        if cu_seqlens is not None:
            if B != 1 or cache is not None or key_padding_mask is not None:
                raise ValueError(f"packed records (cu_seqlens) take tokens of shape (1, L) without a cache or a key "
                                 f"padding mask, got tokens of shape {tuple(tokens.shape)}")
            if max_seqlen is None:
                raise ValueError("max_seqlen must be given with cu_seqlens (the longest packed record)")
            packing = (cu_seqlens, max_seqlen)
            if positions is None:
                positions = packed_positions(cu_seqlens, T)
        start = cache.length if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions, {start} used, cannot add {T}")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        if positions.dim() == 1:
            positions = positions[None]
        cos, sin = rope_cos_sin(positions, self._inv_freq_for(tokens.device))
        h = self.tok_embeddings(tokens)
        samples = cu_seqlens.numel() - 1 if packing is not None else B
        prefixes = self._offset_prefixes(prompt_offset, samples, cache)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if cache is not None:
                h = layer(h, cos, sin, key_padding_mask, (cache.keys[i], cache.values[i]), start, cache.prefixes[i])
            elif recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, key_padding_mask, use_reentrant=False,
                                                      prefix=prefixes[i] if prefixes else None, packing=packing)
            else:
                h = layer(h, cos, sin, key_padding_mask, prefix=prefixes[i] if prefixes else None, packing=packing)
        if cache is not None:
            cache.length = start + T
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))

    def check_prompt_offset(self, prompt_offset: torch.Tensor | None, batch_size: int) -> None:
        """A ValueError naming prompt_offset unless it is None or a float (batch_size, dim) tensor."""
        if prompt_offset is None:
            return
        if not isinstance(prompt_offset, torch.Tensor) or not prompt_offset.is_floating_point():
            raise TypeError(f"prompt_offset must be a float tensor, got {type(prompt_offset).__name__}")
        if tuple(prompt_offset.shape) != (batch_size, self.args.dim):
            raise ValueError(f"prompt_offset must have shape ({batch_size}, {self.args.dim}), "
                             f"got {tuple(prompt_offset.shape)}")
        if self.args.adapter_layers == 0:
            raise ValueError("prompt_offset needs a model with adapter layers (adapter_layers = 0)")

    def _offset_prefixes(self, prompt_offset: torch.Tensor | None, batch_size: int,
                         cache: KVCache | None) -> list | None:
        """Per-sample prefixes of the adapted layers that take the offset (None elsewhere:
        those compute their shared prefix), once per forward."""
        if prompt_offset is None:
            return None
        if cache is not None:
            raise ValueError("prompt_offset: with a KV cache, pass it to KVCache (its prefixes are computed once)")
        self.check_prompt_offset(prompt_offset, batch_size)
        return [layer.attention.adapter_prefix(prompt_offset) if layer.attention.takes_prompt_offset else None
                for layer in self.layers]

    # -- loading and saving --------------------------------------------------------------

    @classmethod
    def _from_state_dict(cls, args: ModelArgs, state: Mapping[str, torch.Tensor], source: str,
                         device: torch.device | str | None, dtype: torch.dtype | None,
                         quantize: str | None = None) -> LLaMAAdapter:
        """Build the model on the meta device (no random init of the base) and take the
        checkpoint's tensors as they are (their dtype, unless `dtype` is given); with
        `quantize`, its linear layers are quantized on their way to `device`."""
        if quantize is not None:
            quantized.check_quantization(quantize, device)
            device, quantize_on = None, device  # the float weights stay where the checkpoint is
        with torch.device("meta"):
            model = cls(args)
        expected = {n for n, _ in model.named_parameters() if not cls._is_adapter_name(n)}
        if args.tie_word_embeddings:
            expected.discard("output.weight")
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{source}: the checkpoint does not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        for name in expected:
            want = model.get_parameter(name).shape
            if state[name].shape != want:
                raise ValueError(f"{source}: {name} has shape {tuple(state[name].shape)}, the config implies "
                                 f"{tuple(want)}")
        device = torch.device(device) if device is not None else None
        loaded = {}
        for name in expected:
            t = state[name]
            if dtype is not None:
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            loaded[name] = t
        model.load_state_dict(loaded, strict=False, assign=True)
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
        target = device or model.tok_embeddings.weight.device
        for name, p in list(model.named_parameters()):
            if cls._is_adapter_name(name):  # still on the meta device: made where the base is
                module_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_name), attr,
                        nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=target)))
        model.reset_adapter()
        model.freeze_base()
        if quantize is not None:
            quantized.quantize_linears(model, quantize, quantize_on)
        return model

    @classmethod
    def from_hf(cls, model_or_folder: Any, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, quantize: str | None = None, **adapter: Any) -> LLaMAAdapter:
        """From a transformers LlamaForCausalLM (its tensors are shared, not copied) or a
        local folder with config.json and model.safetensors (or sharded safetensors with
        model.safetensors.index.json). Keyword arguments set the adapter fields of
        ModelArgs (adapter_len, adapter_layers, gate_activation, scalar_gate,
        attention_backend, max_seq_len); adapter_layers defaults to min(30, n_layers).
        `quantize` ("nf4", "fp4", "int8", "torchao-int8"): the frozen linear layers in 4 or 8 bits
        (`models.quantized`)."""
        args, state, source = hf_meta.read_hf(model_or_folder, **adapter)
        return cls._from_state_dict(args, state, source, device, dtype, quantize)

    @classmethod
    def from_meta(cls, ckpt_dir: str | os.PathLike, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, quantize: str | None = None, **adapter: Any) -> LLaMAAdapter:
        """From Meta's format: a folder with params.json and consolidated.*.pth (one file per
        model-parallel shard; several are merged). Keyword arguments as in `from_hf`."""
        args, state, source = hf_meta.read_meta(ckpt_dir, **adapter)
        return cls._from_state_dict(args, state, source, device, dtype, quantize)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights, with Meta's names and the rotate-half rotary convention."""
        if quantized.is_quantized(self):
            raise ValueError("a quantized base has no full-precision weights to save: load it without quantize")
        skip = {"output.weight"} if self.args.tie_word_embeddings else set()
        return {n: p.detach() for n, p in self.named_parameters() if not self._is_adapter_name(n) and n not in skip}

    def save_hf(self, folder: str | os.PathLike) -> None:
        """Write the base model as a Hugging Face LLaMA folder (config.json + model.safetensors)
        that transformers' LlamaForCausalLM.from_pretrained and `from_hf` read."""
        hf_meta.write_hf(folder, self.base_state_dict(), self.args, self.tok_embeddings.weight.dtype)

    def save_meta(self, folder: str | os.PathLike) -> None:
        """Write the base model in Meta's format (params.json + consolidated.00.pth)."""
        hf_meta.write_meta(folder, self.base_state_dict(), self.args)
