"""LLaMA with LLaMA-Adapter, in one file.

The architecture is Meta's LLaMA (RMSNorm, rotary position embeddings with an optional
Llama-3 style frequency scaling, SwiGLU feed-forward, grouped-query attention). The adapter
is the one of Zhang et al. (2023): in each of the top `adapter_layers` layers a learned
adaption prompt of `adapter_len` vectors of the model width is projected by that layer's
frozen wk and wv into prefix keys and values (without rotary embedding), every query attends
to it with a softmax of its own, and the result is scaled by a gate that starts at zero.
That attention is one call of `gated_prefix_attention`, the fused op of this package.

Weight names follow Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...), so a
`consolidated.*.pth` loads as it is, but the rotary embedding uses the "rotate half"
convention of Hugging Face transformers: Meta's interleaved query/key rows are permuted
once when a Meta checkpoint loads (and back when one is saved), and Hugging Face weights
load without any permutation.

    model = LLaMAAdapter.from_hf("path/to/llama-hf", adapter_len=10, adapter_layers=30)
    logits = model(tokens)                  # (B, T, vocab)
    model.adapter_state_dict()              # what training changes: prompts and gates
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter_fast.attention import BACKENDS, gated_prefix_attention
from llama_adapter_fast.reference import GATE_ACTIVATIONS, allowed_keys
from llama_adapter_fast.varlen import gated_prefix_attention_varlen, packed_positions, varlen_attention

ADAPTER_FORMAT = "llama_adapter_fast.adapter/1"
# The fields of ModelArgs that describe the adapter rather than the base model.
ADAPTER_FIELDS = ("adapter_len", "adapter_layers", "gate_activation", "scalar_gate")
ROPE_TYPES = ("llama3", "linear")


@dataclass
class ModelArgs:
    """Model hyper-parameters, with the field names of Meta's params.json.

    The FFN width follows Meta's rule (2/3 of 4 * dim, times ffn_dim_multiplier, rounded up
    to multiple_of) unless `hidden_dim` gives it explicitly (Hugging Face's
    intermediate_size). `rope_scaling` takes Hugging Face's dict: {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} or
    {"rope_type": "linear", "factor"}. `adapter_layers = 0` gives the plain LLaMA.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    adapter_len: int = 10
    adapter_layers: int = 30
    gate_activation: str = "tanh"
    # Beyond Meta's fields:
    scalar_gate: bool = False  # one gate per layer (PEFT's adaption prompt) instead of one per head
    rope_scaling: dict | None = None
    hidden_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"ModelArgs.dim ({self.dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelArgs.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2 != 0:
            raise ValueError(f"the head dim dim / n_heads must be even for rotary embeddings, got {self.head_dim}")
        if not 0 <= self.adapter_layers <= self.n_layers:
            raise ValueError(f"ModelArgs.adapter_layers must be in [0, n_layers = {self.n_layers}], "
                             f"got {self.adapter_layers}")
        if self.adapter_layers > 0 and self.adapter_len < 1:
            raise ValueError(f"ModelArgs.adapter_len must be >= 1 when adapter_layers > 0, got {self.adapter_len}")
        if self.gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"ModelArgs.gate_activation must be one of {GATE_ACTIVATIONS}, "
                             f"got {self.gate_activation!r}")
        if self.attention_backend not in BACKENDS:
            raise ValueError(f"ModelArgs.attention_backend must be one of {BACKENDS}, got {self.attention_backend!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def adapter_config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ADAPTER_FIELDS}


def _normalize_rope_scaling(scaling: Mapping[str, Any]) -> dict | None:
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(scaling).__name__}")
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type must be one of {ROPE_TYPES} or 'default', got {rope_type!r}")
    needed = ("factor",) + (("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                            if rope_type == "llama3" else ())
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs the keys {missing}")
    return {"rope_type": rope_type, **scaling}


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


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding (float32, CPU), with Llama-3 or linear scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, and the band
    # in between interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B or 1, T, 1, head_dim) in float32 for integer positions (B or 1, T)."""
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) queries or keys, "rotate half" convention, computed in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


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
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.use_adapter = use_adapter
        self.gate_activation = args.gate_activation
        self.backend = args.attention_backend
        if use_adapter:
            # Trainable parameters stay float32 whatever the base dtype (they are small, and
            # the optimizer wants full precision); they are cast where they meet the base.
            self.adapter_prompt = nn.Parameter(torch.empty(args.adapter_len, args.dim, dtype=torch.float32))
            self.gate = nn.Parameter(torch.zeros(() if args.scalar_gate else args.n_heads, dtype=torch.float32))

    def adapter_prefix(self, prompt_offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix keys and values (Hkv, P, D): the prompt through the frozen wk and wv,
        without rotary embedding (the prompt has no position).

        With `prompt_offset` (B, dim), row b is added to every position of the prompt (the
        multi-modal LLaMA-Adapter's P_l + Repeat(I_p)) and the prefix is per sample, (B, Hkv, P, D).
        """
        prompt = self.adapter_prompt
        if prompt_offset is not None:
            prompt = prompt + prompt_offset[:, None, :].to(prompt.dtype)
        if not torch.is_autocast_enabled(prompt.device.type):
            prompt = prompt.to(self.wk.weight.dtype)
        heads = (self.n_kv_heads, self.head_dim)
        prefix_k = self.wk(prompt).unflatten(-1, heads).transpose(-3, -2)
        prefix_v = self.wv(prompt).unflatten(-1, heads).transpose(-3, -2)
        return prefix_k, prefix_v

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
            prefix_k, prefix_v = prefix if prefix is not None else self.adapter_prefix()
            out = gated_prefix_attention(
                q, k, v, prefix_k, prefix_v, self.gate, causal=True, gate_activation=self.gate_activation,
                key_padding_mask=key_padding_mask, backend=self.backend,
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
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, use_adapter=layer_id >= args.n_layers - args.adapter_layers)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, key_padding_mask, cache=None, start=0, prefix=None, packing=None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, key_padding_mask, cache, start, prefix, packing)
        return h + self.feed_forward(self.ffn_norm(h))


class KVCache:
    """Keys and values of every layer for incremental decoding, and the adapter prefixes.

    The prefix keys and values depend only on the weights (and on `prompt_offset`, the
    per-sample image feature of the multi-modal adapter), so they are computed once when the
    cache is made and reused at every decoding step.
    """

    def __init__(self, model: LLaMAAdapter, batch_size: int, max_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 prompt_offset: torch.Tensor | None = None):
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
        with torch.no_grad():
            self.prefixes = [
                tuple(t.to(dtype) for t in layer.attention.adapter_prefix(prompt_offset))
                if layer.attention.use_adapter else None
                for layer in model.layers
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
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._inv_freq = rope_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}
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
        """Prompts N(0, 1) (the original's nn.Embedding default), gates zero."""
        with torch.no_grad():
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
        return name.endswith((".adapter_prompt", ".gate"))

    def adapter_layers(self) -> list[Attention]:
        """The attention modules that carry an adapter (the top `adapter_layers`)."""
        return [layer.attention for layer in self.layers if layer.attention.use_adapter]

    def freeze_base(self) -> None:
        """Only the prompts and gates train."""
        for name, p in self.named_parameters():
            p.requires_grad_(self._is_adapter_name(name))

    def adapter_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if self._is_adapter_name(n)]

    def num_adapter_parameters(self) -> int:
        return sum(p.numel() for _, p in self.adapter_parameters())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors only: layers.N.attention.adapter_prompt (P, dim) and
        layers.N.attention.gate ((n_heads,) or ())."""
        return {n: p.detach() for n, p in self.adapter_parameters()}

    def load_adapter(self, state_dict_or_path: Mapping[str, torch.Tensor] | str | os.PathLike,
                     strict: bool = True) -> None:
        """Load adapter weights from a dict, a .safetensors file written by `save_adapter`,
        a .pt/.pth file (our adapter dict, a training checkpoint of this package, or the
        original LLaMA-Adapter's adapter file with `adapter_query.weight`)."""
        source = str(state_dict_or_path) if isinstance(state_dict_or_path, (str, os.PathLike)) else "state_dict"
        if isinstance(state_dict_or_path, (str, os.PathLike)):
            state = read_adapter_file(state_dict_or_path)
        elif isinstance(state_dict_or_path, Mapping):
            state = dict(state_dict_or_path)
        else:
            raise TypeError(f"load_adapter takes a state dict or a path, got {type(state_dict_or_path).__name__}")
        state = self._convert_original_adapter(state)
        own = dict(self.adapter_parameters())
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        if unexpected or (strict and missing):
            raise ValueError(f"{source}: adapter weights do not match this model (adapter_layers="
                             f"{self.args.adapter_layers}, adapter_len={self.args.adapter_len}, scalar_gate="
                             f"{self.args.scalar_gate}): missing {missing[:4]}, unexpected {unexpected[:4]}")
        with torch.no_grad():
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"{source}: {name} must be a tensor, got {type(value).__name__}")
                if value.shape != own[name].shape:
                    raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, this model expects "
                                     f"{tuple(own[name].shape)}")
                if not torch.isfinite(value).all():
                    raise ValueError(f"{source}: {name} holds non-finite values (a corrupt or diverged adapter?)")
                own[name].copy_(value)

    def _convert_original_adapter(self, state: dict) -> dict:
        """The original code keeps all prompts in one (adapter_layers * P, dim) embedding and
        gates of shape (1, n_heads, 1, 1) in every layer (unused below the adapter layers)."""
        if "adapter_query.weight" not in state:
            return state
        queries = state["adapter_query.weight"]
        layers = self.adapter_layers()
        if queries.dim() != 2 or not layers or queries.shape[0] % len(layers):
            raise ValueError(f"adapter_query.weight of shape {tuple(queries.shape)} does not hold prompts for this "
                             f"model's {len(layers)} adapter layers")
        queries = queries.reshape(len(layers), -1, queries.shape[-1])
        converted = {}
        for i, attn in enumerate(layers):
            lid = self.args.n_layers - len(layers) + i
            converted[f"layers.{lid}.attention.adapter_prompt"] = queries[i]
            gate = state.get(f"layers.{lid}.attention.gate")
            if gate is not None:
                # One gate per head: a file of another head count keeps its shape, for the shape check.
                fits = gate.numel() == attn.gate.numel()
                converted[f"layers.{lid}.attention.gate"] = gate.reshape(attn.gate.shape) if fits else gate
        return converted

    def save_adapter(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                     tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Write the adapter weights (float32) and the adapter config to a .safetensors file,
        atomically (a temporary file in the same folder, then a rename). `tensors` replaces
        the module's own (a state dict gathered from a sharded model)."""
        from safetensors.torch import save_file

        tensors = tensors if tensors is not None else self.adapter_state_dict()
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in tensors.items()}
        meta = {"format": ADAPTER_FORMAT, "adapter_config": json.dumps(self.args.adapter_config())}
        meta.update(metadata or {})
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

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
        for i, layer in enumerate(self.layers):
            if cache is None:
                h = layer(h, cos, sin, key_padding_mask, prefix=prefixes[i] if prefixes else None, packing=packing)
            else:
                h = layer(h, cos, sin, key_padding_mask, (cache.keys[i], cache.values[i]), start, cache.prefixes[i])
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
        """Per-sample prefixes of every adapted layer (None below them), computed once per forward."""
        if prompt_offset is None:
            return None
        if cache is not None:
            raise ValueError("prompt_offset: with a KV cache, pass it to KVCache (its prefixes are computed once)")
        self.check_prompt_offset(prompt_offset, batch_size)
        return [layer.attention.adapter_prefix(prompt_offset) if layer.attention.use_adapter else None
                for layer in self.layers]

    # -- loading and saving --------------------------------------------------------------

    @classmethod
    def _from_state_dict(cls, args: ModelArgs, state: Mapping[str, torch.Tensor], source: str,
                         device: torch.device | str | None, dtype: torch.dtype | None) -> LLaMAAdapter:
        """Build the model on the meta device (no random init of the base) and take the
        checkpoint's tensors as they are (their dtype, unless `dtype` is given)."""
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
        for attn in model.adapter_layers():
            attn.adapter_prompt = nn.Parameter(torch.empty(attn.adapter_prompt.shape, device=target))
            attn.gate = nn.Parameter(torch.zeros(attn.gate.shape, device=target))
        model.reset_adapter()
        model.freeze_base()
        return model

    @classmethod
    def from_hf(cls, model_or_folder: Any, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, **adapter: Any) -> LLaMAAdapter:
        """From a transformers LlamaForCausalLM (its tensors are shared, not copied) or a
        local folder with config.json and model.safetensors (or sharded safetensors with
        model.safetensors.index.json). Keyword arguments set the adapter fields of
        ModelArgs (adapter_len, adapter_layers, gate_activation, scalar_gate,
        attention_backend, max_seq_len); adapter_layers defaults to min(30, n_layers)."""
        if isinstance(model_or_folder, (str, os.PathLike)):
            folder = Path(model_or_folder)
            config_path = folder / "config.json"
            if not config_path.is_file():
                raise ValueError(f"model_or_folder: {folder} has no config.json (expected a Hugging Face "
                                 f"LLaMA folder)")
            config = json.loads(config_path.read_text())
            state = _read_safetensors_folder(folder)
            source = str(folder)
        elif hasattr(model_or_folder, "config") and hasattr(model_or_folder, "state_dict"):
            config = model_or_folder.config.to_dict()
            state = model_or_folder.state_dict()
            source = type(model_or_folder).__name__
        else:
            raise TypeError(f"model_or_folder must be a LlamaForCausalLM or a folder path, "
                            f"got {type(model_or_folder).__name__}")
        args = args_from_hf_config(config, **adapter)
        return cls._from_state_dict(args, hf_to_meta_names(state, args), source, device, dtype)

    @classmethod
    def from_meta(cls, ckpt_dir: str | os.PathLike, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, **adapter: Any) -> LLaMAAdapter:
        """From Meta's format: a folder with params.json and consolidated.*.pth (one file per
        model-parallel shard; several are merged). Keyword arguments as in `from_hf`."""
        folder = Path(ckpt_dir)
        params_path = folder / "params.json"
        shards = sorted(glob.glob(str(folder / "consolidated.*.pth")))
        if not params_path.is_file() or not shards:
            raise ValueError(f"ckpt_dir: {folder} must hold params.json and consolidated.*.pth")
        params = json.loads(params_path.read_text())
        loaded = [torch.load(s, map_location="cpu", mmap=True, weights_only=True) for s in shards]
        state = _merge_meta_shards(loaded, params) if len(loaded) > 1 else loaded[0]
        state = {k: v for k, v in state.items() if k != "rope.freqs"}  # LLaMA 1 stores its frequencies
        args = args_from_meta_params(params, vocab_size=state["tok_embeddings.weight"].shape[0], **adapter)
        state = dict(state)
        for name in list(state):
            if name.endswith("attention.wq.weight"):
                state[name] = _permute_meta_to_hf(state[name], args.n_heads)
            elif name.endswith("attention.wk.weight"):
                state[name] = _permute_meta_to_hf(state[name], args.n_kv_heads)
        return cls._from_state_dict(args, state, str(folder), device, dtype)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen base weights, with Meta's names and this file's rotary convention."""
        skip = {"output.weight"} if self.args.tie_word_embeddings else set()
        return {n: p.detach() for n, p in self.named_parameters() if not self._is_adapter_name(n) and n not in skip}

    def save_hf(self, folder: str | os.PathLike) -> None:
        """Write the base model as a Hugging Face LLaMA folder (config.json + model.safetensors)
        that transformers' LlamaForCausalLM.from_pretrained and `from_hf` read."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu().contiguous() for k, v in meta_to_hf_names(self.base_state_dict(), self.args).items()}
        atomic_write(folder / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        config = hf_config_from_args(self.args, dtype=self.tok_embeddings.weight.dtype)
        atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))

    def save_meta(self, folder: str | os.PathLike) -> None:
        """Write the base model in Meta's format (params.json + consolidated.00.pth)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        a = self.args
        state = {}
        for name, t in self.base_state_dict().items():
            if name.endswith("attention.wq.weight"):
                t = _permute_hf_to_meta(t, a.n_heads)
            elif name.endswith("attention.wk.weight"):
                t = _permute_hf_to_meta(t, a.n_kv_heads)
            state[name] = t.cpu().contiguous()
        if a.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                  "vocab_size": a.vocab_size, "multiple_of": a.multiple_of,
                  "ffn_dim_multiplier": a.ffn_dim_multiplier, "norm_eps": a.norm_eps, "rope_theta": a.rope_theta}
        if a.hidden_dim is not None and a.hidden_dim != dataclasses.replace(a, hidden_dim=None).ffn_hidden_dim:
            raise ValueError(f"save_meta: hidden_dim {a.hidden_dim} cannot be written in params.json (Meta's "
                             f"format derives the FFN width from dim, multiple_of and ffn_dim_multiplier)")
        if a.rope_scaling is not None:
            if a.rope_scaling["rope_type"] != "llama3":
                raise ValueError("save_meta: only Llama-3 rope scaling has a params.json form")
            params.update(use_scaled_rope=True, rope_scaling=a.rope_scaling)
        atomic_write(folder / "consolidated.00.pth", lambda tmp: torch.save(state, tmp))
        atomic_write(folder / "params.json", lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2) + "\n"))


# ----------------------------------------------------------------------------------------
# Checkpoint formats


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(tmp_path) on a temporary file in the target's folder, then rename it over
    the target: a reader never sees a half-written file, even if the writer is killed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_adapter_path(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"adapter file {path} is a folder, not a file")
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist")


def _unreadable_adapter(path: Path, exc: BaseException) -> ValueError:
    return ValueError(f"adapter file {path} cannot be read ({first_line(exc)}): an empty, truncated or corrupt file?")


def _load_pt(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable_adapter(path, exc) from None


def _unwrap_pt(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    state = raw
    for key in ("trainable", "adapter"):  # a training checkpoint of this package
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of adapter tensors, got {type(state).__name__}")
    return state


def read_adapter_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Adapter tensors from a .safetensors file or a .pt/.pth file (a training checkpoint of
    this package is accepted too: its adapter tensors are taken). A missing, empty,
    truncated or corrupt file is a ValueError naming it."""
    path = Path(path)
    _check_adapter_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise _unreadable_adapter(path, exc) from None
    return _unwrap_pt(_load_pt(path), path)


def is_original_adapter(path: str | os.PathLike) -> bool:
    """True for the original LLaMA-Adapter's .pth (one `adapter_query` embedding of every
    prompt), which records neither adapter_len nor adapter_layers."""
    return Path(path).suffix != ".safetensors" and "adapter_query.weight" in read_adapter_file(path)


_ADAPTER_FIELD_CHECKS = {
    "adapter_len": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "adapter_layers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
    "gate_activation": (lambda v: v in GATE_ACTIVATIONS, f"one of {GATE_ACTIVATIONS}"),
    "scalar_gate": (lambda v: isinstance(v, bool), "true or false"),
}


def _recorded_config(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    """The adapter_config metadata of a .safetensors adapter, checked key by key."""
    if "adapter_config" not in meta:
        return {}
    try:
        config = json.loads(meta["adapter_config"])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: its adapter_config metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its adapter_config metadata must be a JSON object, got {type(config).__name__}")
    unknown = sorted(set(config) - set(ADAPTER_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} in its adapter_config metadata (known: {ADAPTER_FIELDS})")
    for key, value in config.items():
        valid, expected = _ADAPTER_FIELD_CHECKS[key]
        if not valid(value):
            raise ValueError(f"{path}: adapter_config {key} must be {expected}, got {value!r}")
    return config


def _config_from_shapes(shapes: Mapping[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    prompts = {k: s for k, s in shapes.items() if k.endswith(".adapter_prompt")}
    gates = [s for k, s in shapes.items() if k.endswith(".gate")]
    if not prompts:
        raise ValueError(f"{path}: no adapter_prompt tensors found")
    lengths = {s[0] if len(s) == 2 else None for s in prompts.values()}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(f"{path}: the adapter prompts must all have the shape (adapter_len, dim), got "
                         f"{sorted(set(prompts.values()))}")
    return {"adapter_len": lengths.pop(), "adapter_layers": len(prompts),
            "scalar_gate": bool(gates) and all(len(s) == 0 for s in gates)}


def _original_config(state: Mapping[str, torch.Tensor], path: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """adapter_len and adapter_layers of an original LLaMA-Adapter file: given, or read from
    its gates. The original keeps a gate in every layer, and only those of the adapted (top)
    layers ever train away from zero."""
    queries = state["adapter_query.weight"]
    if queries.dim() != 2:
        raise ValueError(f"{path}: adapter_query.weight must be 2-d, got shape {tuple(queries.shape)}")
    rows = queries.shape[0]
    length, layers = given.get("adapter_len"), given.get("adapter_layers")
    for option, value in (("--adapter-len", length), ("--adapter-layers", layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be an int >= 1, got {value!r}")
    if layers is None and length is not None and rows % length == 0:
        layers = rows // length
    if layers is None:
        gates = {int(k.split(".")[1]): v for k, v in state.items() if k.startswith("layers.") and k.endswith(".gate")}
        n = max(gates) + 1 if gates else 0
        trained = [i for i in sorted(gates) if bool(gates[i].abs().sum() > 0)]
        if not trained or trained != list(range(n - len(trained), n)) or rows % len(trained):
            raise ValueError(f"{path}: an original LLaMA-Adapter file records neither adapter_len nor adapter_layers, "
                             f"and its gates do not tell them: pass --adapter-len and --adapter-layers (their "
                             f"product is its {rows} prompt vectors)")
        layers = len(trained)
    if length is None:
        if rows % layers:
            raise ValueError(f"--adapter-layers {layers} does not fit {path}: its adapter_query holds {rows} = "
                             f"adapter_len * adapter_layers prompt vectors")
        length = rows // layers
    if length * layers != rows:
        raise ValueError(f"--adapter-len {length} and --adapter-layers {layers} do not fit {path}: its adapter_query "
                         f"holds {rows} = adapter_len * adapter_layers prompt vectors")
    return {"adapter_len": length, "adapter_layers": layers, "scalar_gate": False,
            "gate_activation": given.get("gate_activation", "tanh")}


def read_adapter_config(path: str | os.PathLike, **given: Any) -> dict[str, Any]:
    """The adapter fields (adapter_len, adapter_layers, gate_activation, scalar_gate) of an
    adapter file, so that a model can be built to match it, checked against the file's
    tensor shapes before anything is allocated. `given` (the same fields; None means not
    given) supplies what an original LLaMA-Adapter file does not record, and must agree
    with what a file does record."""
    path = Path(path)
    _check_adapter_path(path)
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(ADAPTER_FIELDS))
    if unknown:
        raise TypeError(f"read_adapter_config got unknown fields {unknown} (known: {ADAPTER_FIELDS})")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:
            raise _unreadable_adapter(path, exc) from None
        recorded = _recorded_config(meta, path)
    else:
        raw = _load_pt(path)
        recorded = {}
        if isinstance(raw, dict) and isinstance(raw.get("config"), dict):  # a training checkpoint
            recorded = {k: raw["config"][k] for k in ("gate_activation",) if k in raw["config"]}
        state = _unwrap_pt(raw, path)
        if "adapter_query.weight" in state:
            return _original_config(state, path, given)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    config = _config_from_shapes(shapes, path)
    for key, value in recorded.items():
        if key in config and config[key] != value:
            raise ValueError(f"{path}: its adapter_config metadata says {key} {value!r}, its tensors say "
                             f"{config[key]!r}")
    config.update(recorded)
    for key, value in given.items():
        if key in config and config[key] != value:
            raise ValueError(f"--{key.replace('_', '-')} {value} disagrees with {path}, which holds {key} "
                             f"{config[key]!r}")
        config[key] = value
    return config


def _read_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The weights a Hugging Face folder names: the shards of model.safetensors.index.json,
    or model.safetensors. Other .safetensors files in the folder (an adapter saved there,
    say) are not weights of the base and are not read."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {exc}") from None
        root = folder.resolve()
        for name in files:
            if not isinstance(name, str) or not (folder / name).resolve().is_relative_to(root):
                raise ValueError(f"{index}: the shard {name!r} lies outside {folder}; an index names files "
                                 f"of its own folder only")
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{folder}: no model.safetensors or model.safetensors.index.json (the weights of a "
                         f"Hugging Face folder)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{index}: names {name}, which {folder} does not hold")
        try:
            state.update(load_file(str(path)))
        except Exception as exc:
            raise ValueError(f"{path}: cannot be read as safetensors ({first_line(exc)})") from None
    return state


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over many lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def args_from_hf_config(config: Mapping[str, Any], **adapter: Any) -> ModelArgs:
    """ModelArgs from a Hugging Face LlamaConfig dict (transformers 4 or 5 layout)."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"config: model_type must be 'llama', got {config.get('model_type')!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config: hidden_act must be 'silu', got {config.get('hidden_act')!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"config: {flag} is not supported by this LLaMA")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"config: head_dim {config['head_dim']} != hidden_size / num_attention_heads is not supported")
    rope = dict(config.get("rope_parameters") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_layers = config["num_hidden_layers"]
    adapter.setdefault("adapter_layers", min(30, n_layers))
    adapter.setdefault("max_seq_len", config.get("max_position_embeddings", 2048))
    return ModelArgs(
        dim=dim, n_layers=n_layers, n_heads=heads, n_kv_heads=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"], norm_eps=config["rms_norm_eps"],
        rope_theta=float(theta), rope_scaling=scaling, tie_word_embeddings=bool(config.get("tie_word_embeddings")),
        **adapter,
    )


def args_from_meta_params(params: Mapping[str, Any], vocab_size: int | None = None, **adapter: Any) -> ModelArgs:
    """ModelArgs from Meta's params.json (LLaMA 1/2/3); unknown fields are ignored."""
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    kwargs = {k: v for k, v in params.items() if k in known and k not in ADAPTER_FIELDS}
    if kwargs.get("vocab_size", -1) in (-1, None):
        if vocab_size is None:
            raise ValueError("params.json has vocab_size -1 and no checkpoint to infer it from")
        kwargs["vocab_size"] = vocab_size
    if params.get("use_scaled_rope") and not kwargs.get("rope_scaling"):
        # Llama 3.1's constants, which Meta's code hard-codes (3.2 adds rope_scaling_factor).
        kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    n_layers = kwargs.get("n_layers", ModelArgs.n_layers)
    adapter.setdefault("adapter_layers", min(30, n_layers))
    return ModelArgs(**kwargs, **adapter)


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
    }
    return config


# Hugging Face name -> Meta name, for one layer's weights.
_HF_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}


def hf_to_meta_names(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in state.items():
        if name in _HF_TOP_NAMES:
            new = _HF_TOP_NAMES[name]
        elif name.startswith("model.layers."):
            _, _, lid, rest = name.split(".", 3)
            module, _, kind = rest.rpartition(".")
            if module not in _HF_LAYER_NAMES:
                new = name  # reported as unexpected by the loader
            else:
                new = f"layers.{lid}.{_HF_LAYER_NAMES[module]}.{kind}"
        elif name.endswith("rotary_emb.inv_freq"):
            continue
        else:
            new = name
        out[new] = t
    if args.tie_word_embeddings:
        out.pop("output.weight", None)
    return out


def meta_to_hf_names(state: Mapping[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    top = {v: k for k, v in _HF_TOP_NAMES.items()}
    layer = {v: k for k, v in _HF_LAYER_NAMES.items()}
    out = {}
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
        else:
            _, lid, rest = name.split(".", 2)
            module, _, kind = rest.rpartition(".")
            out[f"model.layers.{lid}.{layer[module]}.{kind}"] = t
    return out


def _permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (0,1), (2,3)...; the rotate-half convention rotates
    (i, i + D/2). Reordering each head's rows maps one onto the other (what transformers'
    conversion script does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _merge_meta_shards(shards: list[dict[str, torch.Tensor]], params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Merge model-parallel shards: column-parallel weights (wq, wk, wv, w1, w3, output) are
    split on dim 0, row-parallel ones (wo, w2) on dim 1, norms replicated. The embedding is
    split on dim 1 in LLaMA 1/2 and on the vocabulary (dim 0) in Llama 3."""
    dim = params["dim"]
    merged = {}
    for name, first in shards[0].items():
        parts = [s[name] for s in shards]
        if first.dim() == 1 or name == "rope.freqs":
            merged[name] = first
        elif name == "tok_embeddings.weight":
            merged[name] = torch.cat(parts, dim=1 if first.shape[1] != dim else 0)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            merged[name] = torch.cat(parts, dim=1)
        else:
            merged[name] = torch.cat(parts, dim=0)
    return merged
