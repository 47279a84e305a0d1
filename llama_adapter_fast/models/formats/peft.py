"""PEFT's adaption-prompt folder, read and written.

PEFT's ``AdaptionPromptConfig`` on Llama saves a folder with ``adapter_config.json``
(peft_type ADAPTION_PROMPT, adapter_len, adapter_layers, target_modules "self_attn") and
``adapter_model.safetensors``: per adapted layer ``...layers.N.self_attn.adaption_prompt``
of shape (1, adapter_len, hidden) and ``...layers.N.self_attn.adaption_gate`` of shape (1),
one gate per layer applied without an activation. Its prefix keys and values are the
prompt through the layer's own k_proj and v_proj without rotary embedding, the top
adapter_layers layers are adapted: this package's model with gate_activation="identity"
and scalar_gate=True computes the same, so a PEFT folder reads losslessly.

Writing one is lossless where PEFT can hold the adapter: one gate per layer (a tanh gate
is written as its value tanh(g), which PEFT applies as it is; per-head gates only where
every head's activated gate is the same) and no V2 tuning. Anything else is refused with
a message saying what would be lost; nothing is approximated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.files import atomic_folder, first_line
from llama_adapter_fast.ops.reference import activate_gate

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The key prefix PEFT's save_pretrained writes for a PeftModelForCausalLM around LlamaForCausalLM.
PEFT_PREFIX = "base_model.model.model."
_PEFT_KEY = re.compile(r"(?:.*\.)?layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")


def is_peft_folder(path: str | os.PathLike) -> bool:
    """A folder holding a PEFT adapter_config.json (of any PEFT type)."""
    return Path(path).is_dir() and (Path(path) / PEFT_CONFIG).is_file()


def read_peft_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The adapter settings of a PEFT adaption-prompt folder, as this package names them."""
    folder = Path(folder)
    if not is_peft_folder(folder):
        raise ValueError(f"adapter folder {folder} holds no {PEFT_CONFIG}: not a PEFT adapter folder")
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / PEFT_CONFIG} cannot be read ({first_line(exc)})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "ADAPTION_PROMPT":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise ValueError(f"{folder}: a PEFT adapter of peft_type {kind!r}; only ADAPTION_PROMPT (LLaMA-Adapter) "
                         f"adapters convert")
    # None: PEFT fills it from the model type when it loads the adapter (self_attn for Llama).
    if config.get("target_modules") not in (None, "self_attn"):
        raise ValueError(f"{folder}: adaption prompts on {config['target_modules']!r}; this package's model has "
                         f"Llama's self_attn")
    for key in ("adapter_len", "adapter_layers"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{folder / PEFT_CONFIG}: {key} must be an int >= 1, got {value!r}")
    return {"adapter_len": config["adapter_len"], "adapter_layers": config["adapter_layers"],
            "gate_activation": "identity", "scalar_gate": True}


def read_peft_adapter(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adaption-prompt folder under this package's names: each
    adaption_prompt as layers.N.attention.adapter_prompt (adapter_len, hidden) and each
    adaption_gate as layers.N.attention.gate (a scalar)."""
    folder = Path(folder)
    config = read_peft_config(folder)
    weights = next((folder / name for name in PEFT_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise ValueError(f"{folder}: holds neither of {PEFT_WEIGHTS}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(weights))
        else:
            raw = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{weights} cannot be read ({first_line(exc)}): an empty, truncated or corrupt "
                         f"file?") from None
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"{weights}: unexpected tensor {key!r} in an adaption-prompt adapter")
        layer, kind = match.groups()
        if kind == "prompt":
            if tensor.dim() != 3 or tensor.shape[:2] != (1, config["adapter_len"]):
                raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, expected (1, "
                                 f"{config['adapter_len']}, hidden)")
            state[f"layers.{layer}.attention.adapter_prompt"] = tensor[0]
        else:
            if tensor.numel() != 1:
                raise ValueError(f"{weights}: {key} has shape {tuple(tensor.shape)}, expected (1,)")
            state[f"layers.{layer}.attention.gate"] = tensor.reshape(())
    prompts = sum(k.endswith("adapter_prompt") for k in state)
    if prompts != config["adapter_layers"] or len(state) != 2 * prompts:
        raise ValueError(f"{weights}: {prompts} adapted layers with {len(state) - prompts} gates, its config says "
                         f"adapter_layers {config['adapter_layers']}")
    return state


def peft_refusal(state: Mapping[str, torch.Tensor], settings: Mapping[str, Any]) -> str | None:
    """Why an adapter cannot be written as PEFT's adaption prompt, or None where it can."""
    if settings.get("bias_tuning") or settings.get("norm_tuning"):
        return ("it tunes the base (LLaMA-Adapter V2's biases, scales or norms), which PEFT's adaption prompt has no "
                "place for: they would be lost")
    activation = settings.get("gate_activation", "tanh")
    for name, gate in state.items():
        if name.endswith(".gate") and gate.numel() > 1:
            act = activate_gate(gate.double(), activation).flatten()
            if not torch.equal(act, act[:1].expand_as(act)):
                return (f"its gates are per head ({name}: {gate.numel()} different values) and PEFT keeps one gate per "
                        f"layer: the heads' gates would be lost")
    return None


def write_peft_adapter(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], settings: Mapping[str, Any],
                       base_model: str | None = None) -> Path:
    """Write an adapter (this package's names and settings) as a PEFT adaption-prompt folder
    that ``PeftModel.from_pretrained`` loads: the config through PEFT's own
    AdaptionPromptConfig, the tensors under PEFT's names. A ValueError, before anything is
    written, where PEFT cannot hold the adapter (see `peft_refusal`)."""
    reason = peft_refusal(state, settings)
    if reason is not None:
        raise ValueError(f"the adapter cannot be written in PEFT's format: {reason}")
    from peft import AdaptionPromptConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    activation = settings.get("gate_activation", "tanh")
    tensors = {}
    for name, tensor in state.items():
        layer = name.split(".")[1]
        if name.endswith(".adapter_prompt"):
            tensors[f"{PEFT_PREFIX}layers.{layer}.self_attn.adaption_prompt"] = tensor.detach().float()[None]
        elif name.endswith(".gate"):
            gate = activate_gate(tensor.detach().double(), activation).flatten()[:1]
            tensors[f"{PEFT_PREFIX}layers.{layer}.self_attn.adaption_gate"] = gate.float()
        else:
            raise ValueError(f"the adapter cannot be written in PEFT's format: {name} has no place in it")
    config = AdaptionPromptConfig(adapter_len=settings["adapter_len"], adapter_layers=settings["adapter_layers"],
                                  target_modules="self_attn", task_type="CAUSAL_LM",
                                  base_model_name_or_path=base_model)
    tensors = {k: v.contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / PEFT_WEIGHTS[0]))

    atomic_folder(folder, write)
    return folder
