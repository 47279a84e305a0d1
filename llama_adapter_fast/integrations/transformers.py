"""LLaMA-Adapter on transformers models, through transformers' attention interface.

`add_llama_adapter` gives the top layers of a model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` an adaption prompt and a gate, and switches the model to the
attention implementation registered here under the name ``"llama_adapter_fast"``: causal
LMs (Llama, Mistral, Qwen2 and the like) and encoders (ViT, BERT, RoBERTa, both towers of
CLIP), each layer causal or bidirectional as the model's own attention is. Adapted layers
run `gated_prefix_attention`; the others run plain scaled_dot_product_attention. The
matching mask function (transformers 4.53 and later) hands the kernel a (batch, keys)
padding mask instead of a 4-d mask, for causal and bidirectional masks alike.

The mask helpers here are shared with the PEFT integration: they read whatever mask
transformers built (None, a 2-d padding mask, a 4-d boolean or additive mask) as causal
attention plus key padding where it is one, and fall back to a masked two-SDPA computation
where it is not (sliding windows that bite, custom masks). Packed sequences (a batch
flattened by transformers' DataCollatorWithFlattening: position_ids that restart at 0, or
the flash-attention kwargs cu_seq_lens_q and friends) take the packed op,
`gated_prefix_attention_varlen`.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llama_adapter_fast.attention import BACKENDS, gated_prefix_attention
from llama_adapter_fast.reference import GATE_ACTIVATIONS, activate_gate, allowed_keys
from llama_adapter_fast.varlen import gated_prefix_attention_varlen, packed_positions, varlen_attention

ATTENTION_NAME = "llama_adapter_fast"
PROMPT_NAME = "adaption_prompt"
GATE_NAME = "adaption_gate"
ADAPTER_PARAMETER_NAMES = (PROMPT_NAME, GATE_NAME)
_METADATA_KEY = "llama_adapter_fast"
# Attention features of some transformers models that the op does not have.
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")

__all__ = [
    "ATTENTION_NAME",
    "add_llama_adapter",
    "remove_llama_adapter",
    "llama_adapter_state_dict",
    "save_llama_adapter",
    "load_llama_adapter",
    "register_attention",
    "llama_adapter_attention",
    "llama_adapter_mask",
    "masked_gated_prefix_attention",
    "masked_attention",
    "resolve_attention_mask",
    "packed_sequences",
]


# --------------------------------------------------------------------------------------
# Masks: transformers' masks read as causal attention plus key padding
# --------------------------------------------------------------------------------------


class _LastMask:
    """The reading of the last 4-d mask seen. A model passes the same mask tensor to every
    layer, so the check, which costs a device-to-host sync, runs once per forward."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple | None = None
        self._value: tuple[bool, torch.Tensor | None] | None = None

    def get(self, mask: torch.Tensor, key: tuple) -> tuple[bool, torch.Tensor | None] | None:
        if self._ref is not None and self._ref() is mask and self._key == key:
            return self._value
        return None

    def put(self, mask: torch.Tensor, key: tuple, value: tuple[bool, torch.Tensor | None]) -> None:
        self._ref, self._key, self._value = weakref.ref(mask), key, value


_LAST_MASK = _LastMask()


def _allowed_from_4d(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # transformers' additive masks hold 0 where a key is attended and the dtype's minimum
        # (or -inf) where it is not.
        return mask > torch.finfo(mask.dtype).min / 2
    raise TypeError(f"attention_mask must be a bool or float tensor when 4-d, got {mask.dtype}")


def _read_4d_mask(
    mask: torch.Tensor, allowed: torch.Tensor, batch: int, q_len: int, kv_len: int, causal: bool
) -> tuple[bool, torch.Tensor | None]:
    """Whether `allowed` is causal masking plus key padding, and then the (B, S) key
    padding mask (None where nothing is padded). Reads the data: one sync on accelerators."""
    if allowed.shape[1] != 1 or allowed.shape[0] not in (1, batch) or q_len == 0 or kv_len == 0:
        return False, None
    # Causal masking is aligned to the bottom right, so the last query sees every key that
    # is not padding: its row is the key padding mask.
    key_padding = allowed[:, 0, -1, :].expand(batch, kv_len)
    expected = allowed_keys(q_len, kv_len, causal, key_padding, allowed.device)
    # Rows of padding queries (the query's own key is padding, so no real token reads their
    # output) are empty in `expected`; transformers leaves them empty or, in older versions
    # for sdpa, allows every key. Any other row must match.
    padding_row = ~expected.any(dim=-1, keepdim=True) & (~allowed.any(dim=-1, keepdim=True)
                                                         | allowed.all(dim=-1, keepdim=True))
    differs = (allowed != expected) & ~padding_row
    if mask.dtype != torch.bool:
        differs = differs | ((mask != 0) & allowed)  # an additive bias is not a mask
    differ, unpadded = torch.stack([differs.any(), key_padding.all()]).tolist()
    if differ:
        return False, None
    # Without padding the op takes no mask, which keeps its fastest path.
    return True, None if unpadded else key_padding.contiguous()


def resolve_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, causal: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Read a transformers attention mask as causal masking plus key padding where it is one.

    Args:
        attention_mask: None; a 2-d (B, S') padding mask (non-zero = attend; its last S
            columns are used, as flash attention does); or a 4-d mask (B or 1, 1 or H, T, S'
            >= S), boolean (True = attend) or additive float (0 = attend, the dtype's
            minimum or -inf = masked), as transformers builds for sdpa and eager attention.
        batch, q_len, kv_len: B, T and S of the attention call.
        causal: whether the attention is causal (bottom-right aligned).

    Returns:
        (key_padding_mask, allowed), at most one of them not None. key_padding_mask is the
        (B, S) bool mask to hand to `gated_prefix_attention` (None: no padding); allowed,
        when the mask is not causal plus key padding, is the boolean 4-d mask itself.
        Under torch.compile a 4-d mask is returned as `allowed` unread (the check would
        read data and break the graph).
    """
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__} "
            "(flex attention's BlockMask is not supported: use the sdpa or eager implementation)"
        )
    if attention_mask.dim() == 2:
        if attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] < kv_len:
            raise ValueError(
                f"attention_mask must have shape ({batch}, >= {kv_len}) when 2-d, got {tuple(attention_mask.shape)}"
            )
        start = attention_mask.shape[1] - kv_len
        return attention_mask[:, start:].to(torch.bool).expand(batch, kv_len), None
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 2-d or 4-d, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-2] != q_len or attention_mask.shape[-1] < kv_len:
        raise ValueError(
            f"attention_mask must have shape (B, 1, {q_len}, >= {kv_len}) when 4-d, got {tuple(attention_mask.shape)}"
        )
    # Static caches give masks longer than the keys in use; transformers slices them too.
    mask = attention_mask[..., :kv_len]
    allowed = _allowed_from_4d(mask)
    if torch.compiler.is_compiling():
        return None, allowed
    # Inference tensors have no version counter; transformers builds a new mask every forward.
    version = None if attention_mask.is_inference() else attention_mask._version
    key = (version, batch, q_len, kv_len, causal)
    reading = _LAST_MASK.get(attention_mask, key)
    if reading is None:
        reading = _read_4d_mask(mask, allowed, batch, q_len, kv_len, causal)
        _LAST_MASK.put(attention_mask, key, reading)
    representable, key_padding = reading
    return (key_padding, None) if representable else (None, allowed)


Packing = tuple[torch.Tensor, torch.Tensor, int, int]  # cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def packed_sequences(
    kwargs: dict, batch: int, q_len: int, kv_len: int, sliding_window: int | None = None
) -> Packing | None:
    """The packing of a batch of one row holding several sequences, as transformers'
    DataCollatorWithFlattening makes it: from the flash-attention kwargs transformers passes
    along (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k), or else from
    position_ids that restart at 0 inside the row (0, 1, ..., 0, 1, ...). None for any other
    batch, and where a sliding window bites inside a sequence (the packed op has no window:
    only a 4-d mask honours it). Reading position_ids reads data, so under torch.compile
    only the kwargs count."""
    packing = _read_packing(kwargs, batch, q_len, kv_len)
    if packing is not None and sliding_window is not None and packing[3] > sliding_window:
        return None
    return packing


def _read_packing(kwargs: dict, batch: int, q_len: int, kv_len: int) -> Packing | None:
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k", cu_q)
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k", max_q)
        if max_q is None:
            raise ValueError("cu_seq_lens_q needs max_length_q (the flash-attention kwargs come together)")
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    positions = kwargs.get("position_ids")
    # One row of q_len positions only: (1, L) text positions, not multi-axis (rope-section) ones.
    if (positions is None or batch != 1 or q_len != kv_len or q_len < 2 or positions.numel() != q_len
            or torch.compiler.is_compiling()):
        return None
    positions = positions.reshape(-1)
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([q_len])]).to(torch.int32)
    if not torch.equal(positions, packed_positions(cu, q_len)):
        return None  # not sequences laid end to end
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def _packed(x: torch.Tensor) -> torch.Tensor:
    """(1, H, L, D) as the packed op's (L, H, D), a view."""
    return x[0].transpose(0, 1)


def _batched(prefix: torch.Tensor, batch: int) -> torch.Tensor:
    return prefix.unsqueeze(0).expand(batch, *prefix.shape) if prefix.dim() == 3 else prefix


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None, is_causal: bool,
    scale: float | None, dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA whose rows without any allowed key give 0, not NaN."""
    gqa = q.shape[1] != k.shape[1]
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal, scale=scale,
                                              enable_gqa=gqa)
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=dropout, scale=scale,
                                         enable_gqa=gqa)
    return out.masked_fill(~has_key, 0.0)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    softmax_scale: float | None = None,
    causal: bool = True,
    dropout: float = 0.0,
    packing: Packing | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plain attention (no prefix) under a transformers mask: what layers without an
    adapter run. q (B, Hq, T, D), k and v (B, Hkv, S, D); returns (B, Hq, T, D). Packed
    sequences (`packing`, from `packed_sequences`) go through the packed path on `backend`."""
    if packing is not None and dropout and not _is_4d(attention_mask):
        raise ValueError(f"attention dropout ({dropout}) over packed sequences needs a 4-d attention mask: the "
                         "packed path has no dropout, and without the mask the sequences would see each other")
    if packing is not None and not dropout:
        cu_q, _, max_q, _ = packing
        out = varlen_attention(_packed(q), _packed(k), _packed(v), cu_q, max_q, causal=causal,
                               softmax_scale=softmax_scale, backend=backend)
        return out.transpose(0, 1)[None]
    B, _, T, _ = q.shape
    S = k.shape[2]
    key_padding, allowed = resolve_attention_mask(attention_mask, B, T, S, causal)
    is_causal = False
    if allowed is None:
        if key_padding is None and causal and T == S and T > 1:
            is_causal = True  # keeps the flash kernels eligible
        elif key_padding is not None or (causal and T != S and T > 1):
            allowed = allowed_keys(T, S, causal, key_padding, q.device)
    return _masked_sdpa(q, k, v, allowed, is_causal, softmax_scale, dropout)


def masked_gated_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    gate: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    gate_activation: str = "tanh",
    softmax_scale: float | None = None,
    causal: bool = True,
    backend: str = "auto",
    packing: Packing | None = None,
) -> torch.Tensor:
    """`gated_prefix_attention` under a transformers mask, or `gated_prefix_attention_varlen`
    for packed sequences (`packing`, from `packed_sequences`, which the mask then only
    repeats).

    A mask that is causal attention plus key padding (what transformers builds for padded
    batches and KV caches) reaches the op as its key_padding_mask. Any other mask (a sliding
    window shorter than the keys, packed sequences not given as `packing`, a custom 4-d
    mask; or any 4-d mask while torch.compile traces) is honoured exactly by two masked
    scaled_dot_product_attention calls instead of the fused op, whatever `backend` says.
    """
    if packing is not None:
        out = gated_prefix_attention_varlen(
            _packed(q), _packed(k), _packed(v), *packing, prefix_k, prefix_v, gate, causal=causal,
            gate_activation=gate_activation, softmax_scale=softmax_scale, backend=backend,
        )
        return out.transpose(0, 1)[None]
    key_padding, allowed = resolve_attention_mask(attention_mask, q.shape[0], q.shape[2], k.shape[2], causal)
    if allowed is None:
        return gated_prefix_attention(
            q, k, v, prefix_k, prefix_v, gate, causal=causal, gate_activation=gate_activation,
            softmax_scale=softmax_scale, key_padding_mask=key_padding, backend=backend,
        )
    B = q.shape[0]
    word = _masked_sdpa(q, k, v, allowed, False, softmax_scale)
    prefix = _masked_sdpa(q, _batched(prefix_k, B).to(q.dtype), _batched(prefix_v, B).to(q.dtype), None, False,
                          softmax_scale)
    a = activate_gate(gate.float(), gate_activation).reshape(-1, 1, 1)
    return (word.float() + a * prefix.float()).to(q.dtype)


def _is_4d(attention_mask: object) -> bool:
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4


def check_sliding_window(sliding_window: int | None, attention_mask: torch.Tensor | None, kv_len: int,
                         packing: Packing | None = None) -> None:
    """A sliding window is honoured only through a 4-d mask; without one it must not bite.
    Packed sequences (from `packed_sequences`, which drops a packing whose window bites)
    never reach it: each is at most the window long."""
    if sliding_window is not None and packing is None and not _is_4d(attention_mask) and kv_len > sliding_window:
        raise ValueError(
            f"a sliding window of {sliding_window} over {kv_len} keys needs a 4-d attention mask; "
            "the fused op supports causal attention with key padding only"
        )


# The self-attention modules this integration adapts, by the names of their query, key and
# value projections and of their head size. The output projection is the model's business
# (o_proj in Llama, out_proj in CLIP, a sibling module in BERT): the attention function
# returns the heads before it.
_ATTENTION_LAYOUTS = (
    ("q_proj", "k_proj", "v_proj", "head_dim"),  # Llama, Mistral, Qwen2, ViT, CLIP
    ("query", "key", "value", "attention_head_size"),  # BERT, RoBERTa
)


def _attention_layout(module: nn.Module) -> tuple[str, str, str, str] | None:
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
    layout = _attention_layout(module)
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


# --------------------------------------------------------------------------------------
# The attention implementation and its mask function
# --------------------------------------------------------------------------------------


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
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    window = kwargs.get("sliding_window")
    packing = packed_sequences(kwargs, query.shape[0], query.shape[2], key.shape[2], window)
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


# --------------------------------------------------------------------------------------
# Adding, removing, saving and loading the adapter
# --------------------------------------------------------------------------------------


def _layer_stacks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The self-attention modules of each stack of layers (the decoder of a causal LM, the
    encoder of BERT or ViT, each tower of CLIP), bottom to top, keyed by the name of the
    ModuleList that holds the stack."""
    modules = dict(model.named_modules())
    stacks: dict[str, list[nn.Module]] = {}
    for name, module in modules.items():
        if _attention_layout(module) is None:
            continue
        parts = name.split(".")
        parents = (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1))
        stack = next((p for p in parents if isinstance(modules.get(p), nn.ModuleList)), "")
        stacks.setdefault(stack, []).append(module)
    return stacks


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for stack in _layer_stacks(model).values() for m in stack]


def _adapted_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in _attention_modules(model) if isinstance(getattr(m, PROMPT_NAME, None), nn.Parameter)]


def _head_parameter_names(model: nn.Module) -> list[str]:
    """The task head's parameters: those outside the backbone that transformers puts the head
    on (``model.base_model``), weights tied to the backbone (an LM head's) excluded."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    backbone = {id(p) for p in base.parameters()}
    return [name for name, p in model.named_parameters() if id(p) not in backbone]


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(name)
    else:  # transformers before set_attn_implementation existed
        model.config._attn_implementation = name


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


def add_llama_adapter(
    model: nn.Module,
    adapter_len: int = 10,
    adapter_layers: int = 30,
    gate_activation: str = "tanh",
    per_head_gate: bool = True,
    *,
    train_head: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Turn a transformers model into a LLaMA-Adapter, in place.

    In each stack of layers (the decoder of a causal LM; the encoder of ViT, BERT or
    RoBERTa; each of CLIP's two towers) the top `adapter_layers` self-attention modules
    get ``adaption_prompt`` (adapter_len, hidden_size), drawn from N(0, 1) as in the paper,
    and ``adaption_gate``, zeros of shape (num_heads,) with `per_head_gate` or (1,)
    without, both float32 parameters of the attention module. Their prompts pass through
    the layer's frozen key and value projections (no rotary embedding) into prefix keys
    and values that every query attends to with a softmax of its own, scaled by act(gate).
    Word attention stays what the model's is: causal in decoders and CLIP's text tower,
    bidirectional in encoders and CLIP's vision tower, with padding as key padding. Every
    other parameter is frozen (the task head too, unless `train_head`), and the model
    switches to the ``"llama_adapter_fast"`` attention implementation, so padding masks and
    transformers' caches work as before and ``generate()`` works. With zero gates the
    outputs are the base model's.

    Args:
        model: a transformers model whose attention goes through transformers' attention
            interface, with self-attention modules laid out as in Llama (q_proj, k_proj,
            v_proj, head_dim: Llama, Mistral, Qwen2, ViT, CLIP) or BERT (query, key, value,
            attention_head_size: BERT, RoBERTa).
        adapter_len: prompt tokens per layer (P).
        adapter_layers: how many layers of each stack, counted from the top, get a prompt.
        gate_activation: "tanh" (the paper's zero-init attention) or "identity".
        per_head_gate: one gate per query head (True) or one per layer.
        train_head: also train the task head: the parameters outside ``model.base_model``
            (the classifier of ViTForImageClassification or RobertaForSequenceClassification);
            they are then saved with the adapter. A model without a head raises ValueError.
        backend: the op's backend in adapted layers ("auto": the Triton kernels for CUDA
            tensors, two SDPA calls otherwise).

    Returns:
        The same model. `model.llama_adapter_config` holds the settings.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    adapter_len = _check_int("adapter_len", adapter_len, 1)
    adapter_layers = _check_int("adapter_layers", adapter_layers, 1)
    if gate_activation not in GATE_ACTIVATIONS:
        raise ValueError(f"gate_activation must be one of {GATE_ACTIVATIONS}, got {gate_activation!r}")
    for name, flag in (("per_head_gate", per_head_gate), ("train_head", train_head)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not getattr(model, "_supports_attention_backend", True):
        raise TypeError(
            f"model: {type(model).__name__} does not route its attention through transformers' attention "
            "interface (its _supports_attention_backend is False)"
        )
    if _adapted_modules(model):
        raise ValueError("model already has adaption prompts: call remove_llama_adapter first")
    stacks = _layer_stacks(model)
    if not stacks:
        raise ValueError(
            "model has no self-attention modules with query, key and value projections "
            "(q_proj, k_proj, v_proj and head_dim, or query, key, value and attention_head_size)"
        )
    for stack, attentions in stacks.items():
        if adapter_layers > len(attentions):
            raise ValueError(
                f"adapter_layers ({adapter_layers}) is more than the {len(attentions)} layers of {stack or 'the model'}"
            )
    head = _head_parameter_names(model) if train_head else []
    if train_head and not head:
        raise ValueError(f"train_head: {type(model).__name__} has no task head on top of its base model")

    previous = model.config._attn_implementation
    register_attention()
    _set_attn_implementation(model, ATTENTION_NAME)
    for module in (m for attentions in stacks.values() for m in attentions[-adapter_layers:]):
        query_name, key_name, _, head_name = _attention_layout(module)
        key_proj = getattr(module, key_name)
        weight = key_proj.weight
        num_heads = getattr(module, query_name).out_features // getattr(module, head_name)
        prompt = torch.empty(adapter_len, key_proj.in_features, device=weight.device, dtype=torch.float32)
        gate = torch.zeros(num_heads if per_head_gate else 1, device=weight.device, dtype=torch.float32)
        module.register_parameter(PROMPT_NAME, nn.Parameter(prompt.normal_()))
        module.register_parameter(GATE_NAME, nn.Parameter(gate))
        # Plain attributes, read by the attention function.
        module.adaption_gate_activation = gate_activation
        module.adaption_backend = backend
    trained = set(head)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rsplit(".", 1)[-1] in ADAPTER_PARAMETER_NAMES or name in trained)
    model.llama_adapter_config = {
        "adapter_len": adapter_len,
        "adapter_layers": adapter_layers,
        "gate_activation": gate_activation,
        "per_head_gate": per_head_gate,
        "train_head": train_head,
        "head_parameters": head,
        "previous_attn_implementation": previous,
    }
    return model


def remove_llama_adapter(model: nn.Module) -> nn.Module:
    """Undo `add_llama_adapter`: drop the prompts and gates and restore the attention
    implementation the model had. Every parameter stays frozen (a trained head too)."""
    config = getattr(model, "llama_adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter added by add_llama_adapter")
    for module in _adapted_modules(model):
        for name in (*ADAPTER_PARAMETER_NAMES, "adaption_gate_activation", "adaption_backend"):
            delattr(module, name)
    model.requires_grad_(False)
    _set_attn_implementation(model, config["previous_attn_implementation"])
    del model.llama_adapter_config
    return model


# The settings saved with an adapter, with the defaults of files saved before a setting existed.
_SETTINGS = {"adapter_len": None, "adapter_layers": None, "gate_activation": None, "per_head_gate": None,
             "train_head": False}


def llama_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone (prompts and gates, and the task head where it is
    trained), keyed as in model.state_dict()."""
    head = set(getattr(model, "llama_adapter_config", {}).get("head_parameters", ()))
    return {
        name: tensor for name, tensor in model.state_dict().items()
        if name.rsplit(".", 1)[-1] in ADAPTER_PARAMETER_NAMES or name in head
    }


def save_llama_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the adapter's tensors (with the task head where it is trained) and settings to
    one safetensors file."""
    from safetensors.torch import save_file

    config = getattr(model, "llama_adapter_config", None)
    if config is None:
        raise ValueError("model has no adapter added by add_llama_adapter")
    settings = {k: config[k] for k in _SETTINGS}
    tensors = {name: t.detach().contiguous().cpu() for name, t in llama_adapter_state_dict(model).items()}
    save_file(tensors, os.fspath(path), metadata={"format": "pt", _METADATA_KEY: json.dumps(settings)})


def load_llama_adapter(model: nn.Module, path: str | os.PathLike, *, backend: str = "auto") -> nn.Module:
    """Load an adapter saved by `save_llama_adapter` (and the task head saved with it) into
    `model`, adding the adapter first (with the saved settings) where the model has none.
    Returns the model."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if _METADATA_KEY not in metadata:
        raise ValueError(f"path: {os.fspath(path)!r} is not an adapter saved by save_llama_adapter")
    settings = {**_SETTINGS, **json.loads(metadata[_METADATA_KEY])}
    config = getattr(model, "llama_adapter_config", None)
    if config is None:
        add_llama_adapter(model, **settings, backend=backend)
    elif any(config[k] != v for k, v in settings.items()):
        raise ValueError(f"the model's adapter settings differ from the saved ones: {settings}")
    state = llama_adapter_state_dict(model)
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ValueError(f"adapter tensors do not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != tensors[name].shape:
                raise ValueError(f"{name}: saved shape {tuple(tensors[name].shape)}, model has {tuple(tensor.shape)}")
            tensor.copy_(tensors[name])
    return model
