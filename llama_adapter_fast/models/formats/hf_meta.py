"""Base checkpoints: Hugging Face folders (config.json and safetensors, sharded or not) and
Meta's format (params.json and consolidated.*.pth shards), read into `ModelArgs` and a
state dict with this package's (Meta's) names, and written back.

The model uses the "rotate half" rotary convention of Hugging Face transformers: Meta's
interleaved query/key rows are permuted once when a Meta checkpoint is read (and back when
one is written), and Hugging Face weights need no permutation.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_write, first_line
from llama_adapter_fast.models.config import ADAPTER_FIELDS, ModelArgs


def read_hf(model_or_folder: Any, **adapter: Any) -> tuple[ModelArgs, dict[str, torch.Tensor], str]:
    """(ModelArgs, state dict with Meta's names, a name for messages) of a transformers
    LlamaForCausalLM (its tensors are shared, not copied) or a local Hugging Face folder."""
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
    return args, hf_to_meta_names(state, args), source


def read_meta(ckpt_dir: str | os.PathLike, **adapter: Any) -> tuple[ModelArgs, dict[str, torch.Tensor], str]:
    """(ModelArgs, state dict in the rotate-half convention, the folder's name) of Meta's
    format: params.json and consolidated.*.pth (one file per model-parallel shard; several
    are merged)."""
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
    for name in list(state):
        if name.endswith("attention.wq.weight"):
            state[name] = permute_meta_to_hf(state[name], args.n_heads)
        elif name.endswith("attention.wk.weight"):
            state[name] = permute_meta_to_hf(state[name], args.n_kv_heads)
    return args, state, str(folder)


def write_hf(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], args: ModelArgs,
             dtype: torch.dtype) -> None:
    """A Hugging Face LLaMA folder (config.json + model.safetensors) of a base state dict
    with Meta's names, that transformers' LlamaForCausalLM.from_pretrained and `read_hf` read."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in meta_to_hf_names(state, args).items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = hf_config_from_args(args, dtype=dtype)
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def write_meta(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], args: ModelArgs) -> None:
    """Meta's format (params.json + consolidated.00.pth) of a base state dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a = args
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = permute_hf_to_meta(t, a.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = permute_hf_to_meta(t, a.n_kv_heads)
        out[name] = t.cpu().contiguous()
    if a.tie_word_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
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
    atomic_write(folder / "consolidated.00.pth", lambda tmp: torch.save(out, tmp))
    atomic_write(folder / "params.json", lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2) + "\n"))


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


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta rotates interleaved pairs (0,1), (2,3)...; the rotate-half convention rotates
    (i, i + D/2). Reordering each head's rows maps one onto the other (what transformers'
    conversion script does)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
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
