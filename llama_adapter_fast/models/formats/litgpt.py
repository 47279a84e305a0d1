"""litgpt's adapter and adapter_v2 files, read and written.

litgpt's finetune scripts save {"model": state dict} with fabric.save (lit_model.pth.adapter,
lit_model.pth.adapter_v2). Read, they become this package's names and the settings of the
model that computes what litgpt computes with them (litgpt's prefix projection, one identity
gate per head; with adapter_v2 a bias and an output scale on every linear layer and the LM
head, and the norms). Writing refuses what litgpt cannot hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_write
from llama_adapter_fast.ops.reference import activate_gate

_LITGPT_PROMPT = re.compile(r"transformer\.h\.(\d+)\.attn\.(adapter_wte\.weight|gating_factor)$")
_LITGPT_TUNED = re.compile(r"(?:transformer\.h\.(\d+)\.)?(attn\.qkv|attn\.proj|mlp\.fc_1|mlp\.fc_2|mlp\.proj|lm_head)"
                           r"\.adapter_(bias|scale)$")
_LITGPT_NORM = re.compile(r"transformer\.(?:h\.(\d+)\.(norm_1|norm_2)|(ln_f))\.weight$")
_LITGPT_LINEARS = {"attn.proj": "attention.wo", "mlp.fc_1": "feed_forward.w1", "mlp.fc_2": "feed_forward.w3",
                   "mlp.proj": "feed_forward.w2"}
_LITGPT_NORMS = {"norm_1": "attention_norm", "norm_2": "ffn_norm"}


def litgpt_state(raw: Any) -> dict[str, torch.Tensor] | None:
    """The state dict of a litgpt adapter or adapter_v2 checkpoint, or None for anything else."""
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if isinstance(state, dict) and any(isinstance(k, str) and _LITGPT_PROMPT.match(k) for k in state):
        return state
    return None


def read_litgpt_adapter(state: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A litgpt adapter (or adapter_v2) state dict under this package's names, and the
    settings of the model that computes what litgpt computes with it: litgpt's prefix
    projection, one identity gate per head (its gating_factor); with adapter_v2, a bias and
    an output scale on every linear layer and the LM head, and the norms."""
    prompts = {int(m[1]): t for k, t in state.items() if (m := _LITGPT_PROMPT.match(k)) and m[2].startswith("adapter")}
    gates = {int(m[1]): t for k, t in state.items() if (m := _LITGPT_PROMPT.match(k)) and m[2] == "gating_factor"}
    if not prompts or set(prompts) != set(gates) or len({tuple(t.shape) for t in prompts.values()}) != 1:
        raise ValueError(f"{source}: a litgpt adapter needs adapter_wte and gating_factor of one shape in each adapted "
                         f"layer; it has prompts in layers {sorted(prompts)} and gates in {sorted(gates)}")
    n_heads = next(iter(gates.values())).numel()
    length, dim = next(iter(prompts.values())).shape
    head = dim // n_heads
    out = {f"layers.{i}.attention.adapter_prompt": t for i, t in prompts.items()}
    out |= {f"layers.{i}.attention.gate": t.reshape(-1) for i, t in gates.items()}
    v2 = False
    for key, t in state.items():
        if _LITGPT_PROMPT.match(key):
            continue
        if m := _LITGPT_TUNED.match(key):
            v2, (layer, module, kind) = True, m.groups()
            name = f"tuned_{kind}"
            if module == "lm_head":
                out[f"output.{name}"] = t
            elif module == "attn.qkv":  # litgpt's fused [q | k | v] projection
                groups = (t.numel() // head - n_heads) // 2
                q, k, v = t.split((n_heads * head, groups * head, groups * head))
                out |= {f"layers.{layer}.attention.w{x}.{name}": y for x, y in zip("qkv", (q, k, v), strict=True)}
            else:
                out[f"layers.{layer}.{_LITGPT_LINEARS[module]}.{name}"] = t
        elif m := _LITGPT_NORM.match(key):
            layer, norm, final = m.groups()
            out["norm.weight" if final else f"layers.{layer}.{_LITGPT_NORMS[norm]}.weight"] = t
        else:
            raise ValueError(f"{source}: {key!r} has no place in this package's LLaMA (a litgpt model of another "
                             f"architecture?)")
    settings = {"adapter_len": length, "adapter_layers": len(prompts), "gate_activation": "identity",
                "scalar_gate": False, "prefix_projection": "litgpt"}
    if v2:
        settings |= {"bias_tuning": sorted({k.rsplit(".", 2)[-2] for k in out if ".tuned_" in k}, key=_linear_order),
                     "scale_tuning": "output", "norm_tuning": any(k.endswith("norm.weight") for k in out)}
    return out, settings


def _linear_order(name: str) -> int:
    from llama_adapter_fast.models.tuning import TUNABLE_LINEARS

    return TUNABLE_LINEARS.index(name)


def litgpt_refusal(state: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> str | None:
    """Why an adapter cannot be written as a litgpt checkpoint, or None where it can."""
    if settings.get("prefix_projection", "own") != "litgpt":
        return ("its prefix keys and values come from its layers' own k and v projections, and litgpt's adapter reads "
                "other rows of its qkv projection: litgpt would compute another model (train with "
                "prefix_projection='litgpt', or convert litgpt's own checkpoints)")
    if settings.get("scalar_gate"):
        return "its gate is one per layer and litgpt's gating_factor is one per head (the head count is not recorded)"
    if settings.get("scale_tuning") == "input" and settings.get("bias_tuning"):
        return "its scales multiply the layers' inputs, and litgpt's adapter_v2 scales their outputs"
    tuned = set(settings.get("bias_tuning") or ())
    if tuned & {"wq", "wk", "wv"} and not {"wq", "wk", "wv"} <= tuned:
        return "litgpt's qkv projection is one layer: wq, wk and wv are tuned together or not at all"
    return None


def write_litgpt_adapter(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                         settings: Mapping[str, Any]) -> Path:
    """Write an adapter as litgpt's adapter (no V2 tuning) or adapter_v2 checkpoint, which
    litgpt's GPT loads with load_state_dict(torch.load(path)["model"], strict=False);
    linear layers this adapter does not tune keep litgpt's initial bias 0 and scale 1. A
    ValueError, before anything is written, where litgpt cannot hold it."""
    reason = litgpt_refusal(state, settings)
    if reason is not None:
        raise ValueError(f"the adapter cannot be written as a litgpt checkpoint: {reason}")
    activation = settings.get("gate_activation", "tanh")
    ours_to_litgpt = {v: k for k, v in _LITGPT_LINEARS.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        t = t.detach().float()
        parts = name.split(".")
        if name.endswith(".adapter_prompt"):
            out[f"transformer.h.{parts[1]}.attn.adapter_wte.weight"] = t
        elif name.endswith(".gate"):
            out[f"transformer.h.{parts[1]}.attn.gating_factor"] = activate_gate(t, activation).reshape(1, 1, -1, 1)
        elif name.startswith("output.tuned_"):
            out[f"lm_head.adapter_{parts[-1].removeprefix('tuned_')}"] = t
        elif ".tuned_" in name:
            module, kind = ".".join(parts[2:-1]), parts[-1].removeprefix("tuned_")
            if module in ("attention.wq", "attention.wk", "attention.wv"):
                qkv.setdefault((parts[1], kind), {})[module[-2:]] = t
            else:
                out[f"transformer.h.{parts[1]}.{ours_to_litgpt[module]}.adapter_{kind}"] = t
        elif name == "norm.weight":
            out["transformer.ln_f.weight"] = t
        elif name.endswith("norm.weight"):
            norm = {v: k for k, v in _LITGPT_NORMS.items()}[parts[2]]
            out[f"transformer.h.{parts[1]}.{norm}.weight"] = t
        else:
            raise ValueError(f"the adapter cannot be written as a litgpt checkpoint: {name} has no place in it")
    for (layer, kind), pieces in qkv.items():
        out[f"transformer.h.{layer}.attn.qkv.adapter_{kind}"] = torch.cat([pieces[w] for w in ("wq", "wk", "wv")])
    if settings.get("bias_tuning") and settings.get("scale_tuning") == "none":  # litgpt's scales: all ones
        for key in [k for k in out if k.endswith("adapter_bias")]:
            out[key.removesuffix("bias") + "scale"] = torch.ones_like(out[key])
    atomic_write(path, lambda tmp: torch.save({"model": out}, tmp))
    return Path(path)
