"""The original LLaMA-Adapter releases (github.com/OpenGVLab/LLaMA-Adapter), read and written.

- **V1** (alpaca_finetuning_v1): a plain dict. `adapter_query.weight`, of shape
  (adapter_layers * adapter_len, dim), holds the prompts of the adapted layers, the lowest
  first; `layers.N.attention.gate`, of shape (1, n_heads, 1, 1), is kept for every layer
  (only the top adapter_layers train). Neither adapter_len nor adapter_layers is recorded.
- **V2, the 65B chat release** (llama_adapter_v2_chat65b): {"model": state}, with the same
  prompts, gates in the adapted layers only, and in every block a zero-initialized bias and
  a one-initialized scale on the *input* of wq, wk, wv, wo, w1, w2 and w3, y = W (s * x) + b,
  as `<linear>_bias` and `<linear>_scale`, and the blocks' norms (`attention_norm`,
  `ffn_norm`; the final norm is not tuned).
- **V2, the multi-modal 7B release's language model** (llama_adapter_v2_multimodal7b):
  {"model": state, "config": ...} with the model under `llama.`: nn.Linear biases
  `.bias` on wq, wo, w1, w2 and w3, every norm including the final one, and `adapter_query`
  at the top level. Its visual encoder (CLIP projection, visual query and blocks) has no
  place in a text model and its LoRA variant none in this package: both are refused.

Every release computes a layer's prefix keys and values as its prompt through that layer's
wk and wv (with their bias and scale), without norm or rotary embedding, and scales the
prefix attention by tanh(gate), one gate per head (V1's first inference script, example.py,
applies the gate without tanh: read such a file with gate_activation "identity"). Meta's wq
and wk rotate interleaved pairs and this package's model stores them in the rotate-half
order (formats/hf_meta.py), so the biases of wq and wk are permuted like their rows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_write
from llama_adapter_fast.models.formats.hf_meta import permute_hf_to_meta, permute_meta_to_hf
from llama_adapter_fast.models.tuning import TUNABLE_LINEARS

QUERY_KEY = "adapter_query.weight"
_GATE = re.compile(r"layers\.(\d+)\.attention\.gate$")
# A V2 tensor under this package's names: the chat release's `wq_bias`, the 7B release's `wq.bias`.
_TUNED = re.compile(r"layers\.(\d+)\.(attention|feed_forward)\.(wq|wk|wv|wo|w1|w2|w3)(?:_|\.)(bias|scale)$")
_NORM = re.compile(r"(?:layers\.\d+\.(?:attention_norm|ffn_norm)|norm)\.weight$")
_MULTIMODAL_PARTS = ("clip_proj", "clip_proj_norm", "visual_query", "visual_blocks", "visual_proj", "visual_proj_norm")


def original_state(raw: Any, source: str) -> dict[str, torch.Tensor] | None:
    """The tensors of an original release (V1's dict, V2's {"model": ...}) under the names
    of the chat release (the 7B release's `llama.` prefix dropped), or None for anything
    else. What a text model cannot hold (a visual encoder, LoRA) is a ValueError."""
    if not isinstance(raw, dict):
        return None
    state = raw["model"] if isinstance(raw.get("model"), dict) else raw
    if not isinstance(state.get(QUERY_KEY), torch.Tensor):
        return None
    visual = sorted({k.split(".")[0] for k in state if k.split(".")[0] in _MULTIMODAL_PARTS})
    if visual:
        raise ValueError(f"{source}: an original LLaMA-Adapter V2 multi-modal checkpoint; its visual encoder "
                         f"({', '.join(visual)}) adds each picture to the prompts and has no place in this package's "
                         f"text model, and its prompts alone would be another model")
    lora = [k for k in state if ".lora_" in k or k.endswith(".new_gate")]
    if lora:
        raise ValueError(f"{source}: an original LLaMA-Adapter V2 checkpoint with LoRA ({lora[0]}, ...), which this "
                         f"package's model does not have")
    out = {k.removeprefix("llama."): v for k, v in state.items()}
    unknown = [k for k in out if k != QUERY_KEY and not (_GATE.match(k) or _TUNED.match(k) or _NORM.match(k))]
    if unknown:
        raise ValueError(f"{source}: {unknown[0]!r} has no place in an adapter (a whole training checkpoint? the "
                         f"releases' adapter files hold only the prompts, gates, biases, scales and norms)")
    return out


def _n_layers(state: Mapping[str, torch.Tensor]) -> int:
    return 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=-1)


def _layers_told_by_gates(state: Mapping[str, torch.Tensor], rows: int) -> tuple[int | None, bool]:
    """The adapted layers an original file's gates tell, and whether exactly: where only some
    layers keep a gate (V2), those, exactly; where every layer does (V1), the top ones whose
    gates trained away from zero, at least (an adapted layer's gate may still be zero).
    (None, False) where the gates tell nothing."""
    gates = {int(m[1]): v for k, v in state.items() if (m := _GATE.match(k))}
    n = _n_layers(state)
    present = sorted(gates)
    if present and len(present) < n and present == list(range(n - len(present), n)):
        return (len(present), True) if rows % len(present) == 0 else (None, False)
    trained = [i for i in present if bool(gates[i].abs().sum() > 0)]
    if not trained or trained != list(range(n - len(trained), n)) or rows % len(trained):
        return None, False
    return len(trained), False


def original_config(state: Mapping[str, torch.Tensor], source: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter settings of an original file. adapter_len and adapter_layers are given,
    or read from its gates: where only some layers keep one (V2), those are the adapted
    layers; where every layer does (V1), the adapted layers are the top ones whose gates
    trained away from zero. V2's tuning is read from its tensors' names."""
    queries = state[QUERY_KEY]
    if queries.dim() != 2:
        raise ValueError(f"{source}: {QUERY_KEY} must be 2-d, got shape {tuple(queries.shape)}")
    rows = queries.shape[0]
    length, layers = given.get("adapter_len"), given.get("adapter_layers")
    for option, value in (("--adapter-len", length), ("--adapter-layers", layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{option} must be an int >= 1, got {value!r}")
    if layers is None and length is not None and rows % length == 0:
        layers = rows // length
    told, exactly = _layers_told_by_gates(state, rows)
    if layers is None:
        if told is None:
            raise ValueError(f"{source}: an original LLaMA-Adapter file records neither adapter_len nor "
                             f"adapter_layers, and its gates do not tell them: pass --adapter-len and "
                             f"--adapter-layers (their product is its {rows} prompt vectors)")
        layers = told
    elif told is not None and (layers != told if exactly else layers < told):
        # Another split of the prompt vectors would drop trained gates (or, where the file keeps
        # gates only in its adapted layers, adapt layers it never trained).
        option = "--adapter-layers" if given.get("adapter_layers") is not None else "--adapter-len"
        where = "in" if exactly else "trained in"
        raise ValueError(f"{option} {given.get('adapter_layers') or given.get('adapter_len')} disagrees with "
                         f"{source}: its gates are {where} its top {told} layers, so it holds "
                         f"{'' if exactly else 'at least '}{told} layers of prompt vectors")
    if length is None:
        if rows % layers:
            raise ValueError(f"--adapter-layers {layers} does not fit {source}: its {QUERY_KEY} holds {rows} = "
                             f"adapter_len * adapter_layers prompt vectors")
        length = rows // layers
    if length * layers != rows:
        raise ValueError(f"--adapter-len {length} and --adapter-layers {layers} do not fit {source}: its {QUERY_KEY} "
                         f"holds {rows} = adapter_len * adapter_layers prompt vectors")
    config = {"adapter_len": length, "adapter_layers": layers, "scalar_gate": False,
              "gate_activation": given.get("gate_activation", "tanh")}
    tuned = [m.groups() for k in state if (m := _TUNED.match(k))]
    biased = {(layer, linear) for layer, _, linear, kind in tuned if kind == "bias"}
    scaled = {(layer, linear) for layer, _, linear, kind in tuned if kind == "scale"}
    if scaled and scaled != biased:
        raise ValueError(f"{source}: V2's biases and scales must come in pairs (as in the 65B release); it has "
                         f"{len(biased)} biases and {len(scaled)} scales")
    norms = any(_NORM.match(k) for k in state)
    if tuned or norms:
        config |= {"bias_tuning": [n for n in TUNABLE_LINEARS if n in {linear for _, linear in biased}],
                   "scale_tuning": "input" if scaled else "none", "norm_tuning": norms}
    return config


def original_to_ours(state: Mapping[str, torch.Tensor], adapter_layers: int) -> dict[str, torch.Tensor]:
    """An original file's tensors under this package's names, for a model whose top
    `adapter_layers` layers are adapted: prompts per layer, gates (n_heads,), V2's biases
    and scales as <linear>.tuned_bias and <linear>.tuned_scale, the norms as they are."""
    queries = state[QUERY_KEY]
    n_layers = _n_layers(state)
    if queries.dim() != 2 or adapter_layers < 1 or queries.shape[0] % adapter_layers or adapter_layers > n_layers:
        raise ValueError(f"{QUERY_KEY} of shape {tuple(queries.shape)} does not hold prompts for "
                         f"{adapter_layers} adapter layers of a {n_layers}-layer model")
    dim = queries.shape[1]
    gate = next((v for k, v in state.items() if _GATE.match(k)), None)
    if gate is None:
        raise ValueError("an original LLaMA-Adapter file holds a gate (1, n_heads, 1, 1) per adapted layer; this one "
                         "holds none")
    head_dim = dim // gate.numel()
    out: dict[str, torch.Tensor] = {}
    for i, prompt in enumerate(queries.reshape(adapter_layers, -1, dim)):
        lid = n_layers - adapter_layers + i
        out[f"layers.{lid}.attention.adapter_prompt"] = prompt
        if (gate := state.get(f"layers.{lid}.attention.gate")) is not None:
            out[f"layers.{lid}.attention.gate"] = gate.reshape(-1)
    for key, t in state.items():
        if m := _TUNED.match(key):
            layer, block, linear, kind = m.groups()
            if kind == "bias" and linear in ("wq", "wk"):
                if t.dim() != 1 or t.numel() % head_dim:
                    raise ValueError(f"{key} has shape {tuple(t.shape)}: not a bias of whole heads of {head_dim}")
                t = permute_meta_to_hf(t[:, None], t.numel() // head_dim)[:, 0]
            out[f"layers.{layer}.{block}.{linear}.tuned_{kind}"] = t
        elif _NORM.match(key):
            out[key] = t
    return out


def original_refusal(settings: Mapping[str, Any]) -> str | None:
    """Why an adapter cannot be written as an original release's file, or None where it can."""
    if settings.get("prefix_projection", "own") != "own":
        return "its prefix keys and values follow litgpt's qkv layout, and the original code projects the prompt " \
               "with the layer's own wk and wv"
    if settings.get("scalar_gate"):
        return "its gate is one per layer and the original's is one per head (the head count is not recorded)"
    if settings.get("gate_activation", "tanh") != "tanh":
        return "its gates apply without tanh, and the original V2 code (and V1's training code) applies tanh(gate)"
    tuned = settings.get("bias_tuning") or ()
    if "output" in tuned:
        return "it tunes the LM head's bias and scale, which the original code does not have"
    if tuned and settings.get("scale_tuning") == "output":
        return "its scales multiply the layers' outputs, and the original 65B release scales their inputs"
    return None


def write_original_adapter(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                           settings: Mapping[str, Any]) -> Path:
    """Write an adapter (this package's names and settings) as an original release loads it
    with load_state_dict(strict=False): V1's plain dict without V2's tuning, else the 65B
    chat release's {"model": state} (linear layers it does not tune keep that code's
    initial bias 0 and scale 1). A ValueError, before anything is written, where the
    original cannot hold it (see `original_refusal`)."""
    reason = original_refusal(settings)
    if reason is not None:
        raise ValueError(f"the adapter cannot be written as an original LLaMA-Adapter file: {reason}")
    if Path(path).suffix != ".pth":
        raise ValueError(f"--out {path}: an original LLaMA-Adapter file ends in .pth")
    prompts = sorted((int(k.split(".")[1]), t) for k, t in state.items() if k.endswith(".adapter_prompt"))
    gates = {k: t for k, t in state.items() if k.endswith(".gate")}
    if not prompts or len(gates) != len(prompts):
        raise ValueError("the adapter cannot be written as an original LLaMA-Adapter file: the original holds "
                         f"one prompt and one gate per adapted layer, this adapter {len(prompts)} and {len(gates)}")
    heads = next(iter(gates.values())).numel()
    head_dim = prompts[0][1].shape[-1] // heads
    out = {QUERY_KEY: torch.cat([t.detach().float() for _, t in prompts])}
    out |= {k: t.detach().float().reshape(1, heads, 1, 1) for k, t in gates.items()}
    for key, t in state.items():
        t = t.detach().float()
        if ".tuned_" in key:
            module, kind = key.rsplit(".", 1)
            if kind == "tuned_bias" and module.endswith(("wq", "wk")):
                t = permute_hf_to_meta(t[:, None], t.numel() // head_dim)[:, 0]
            out[f"{module}_{kind.removeprefix('tuned_')}"] = t
        elif key.endswith("norm.weight"):
            out[key] = t
        elif not key.endswith((".adapter_prompt", ".gate")):
            raise ValueError(f"the adapter cannot be written as an original LLaMA-Adapter file: {key} has no place "
                             f"in it")
    v2 = len(out) > 1 + len(gates)
    atomic_write(path, lambda tmp: torch.save({"model": out} if v2 else out, tmp))
    return Path(path)
