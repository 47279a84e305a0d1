"""What vLLM serves: the model folder (the base's files, linked, and a config.json that names
the ``LlamaAdapterForCausalLM`` architecture, the adapters' settings and a default adapter
file, if any), and one LoRA folder per adapter chosen by request (a LoRA of zero weights,
which carries the request to its adapter through vLLM's LoRA path, and the adapter file).
No vLLM import here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama_adapter_fast.integrations.vllm.fold import check_foldable, has_tuning, tuning_config
from llama_adapter_fast.models.formats.native import read_adapter, read_adapter_config, with_own_names

ARCHITECTURE = "LlamaAdapterForCausalLM"
# The adapter file inside a LoRA folder.
ADAPTER_FILE = "llama_adapter.safetensors"
# What every adapter of one served model shares (the model's layers are built for them).
SHARED_SETTINGS = ("adapter_len", "adapter_layers", "gate_activation", "scalar_gate")


def check_same_settings(model_settings: dict, settings: dict, adapter: str | os.PathLike) -> None:
    """A ValueError naming `adapter` where it needs another model than the served one."""
    differ = {k: (settings.get(k), model_settings.get(k)) for k in SHARED_SETTINGS
              if settings.get(k) != model_settings.get(k)}
    if differ:
        raise ValueError(f"adapter {adapter} does not fit the served model: "
                         + ", ".join(f"{k} {a!r} (served: {b!r})" for k, (a, b) in differ.items()))


def check_servable(base_config: dict, adapter: str | os.PathLike, fold: bool = False) -> dict:
    """The adapter's settings, after a ValueError naming `adapter` where vLLM's model cannot
    compute it on this base: another base's width or depth, litgpt's projection, V2's tuning
    that cannot be folded into the weights (see `fold`), or any V2 tuning without `fold` (an
    adapter chosen per request shares the base's weights)."""
    settings = read_adapter_config(adapter)
    if has_tuning(settings):
        if not fold:
            raise ValueError(f"adapter {adapter}: V2's bias, scale and norm tuning change the base's own weights, so "
                             f"it cannot share a base with other adapters; serve it alone (one --adapter, no "
                             f"--base-name), its tuning folded into the weights")
        check_foldable(settings, adapter)
        own = [flag for flag in ("attention_bias", "mlp_bias") if base_config.get(flag)]
        if own:
            raise ValueError(f"adapter {adapter}: V2's tuning folds into a base without biases; this base has {own}")
    if settings.get("prefix_projection", "own") != "own":
        raise ValueError(f"adapter {adapter}: the {settings['prefix_projection']!r} prefix projection is not served "
                         f"by vLLM yet")
    layers, width = base_config.get("num_hidden_layers"), base_config.get("hidden_size")
    state = with_own_names(read_adapter(adapter).state, settings["adapter_layers"])
    prompts = [v for k, v in state.items() if k.endswith("adapter_prompt")]
    if settings["adapter_layers"] > layers or any(p.shape[-1] != width for p in prompts):
        shape = tuple(prompts[0].shape) if prompts else ()
        raise ValueError(f"adapter {adapter} is for another base: {settings['adapter_layers']} adapted layers with "
                         f"prompts of shape {shape}, the base has {layers} layers of width {width}")
    return settings


def served_model_folder(base: str | os.PathLike, adapter: str | os.PathLike | None, out: str | os.PathLike,
                        settings: dict | None = None) -> Path:
    """Write the folder vLLM serves on `base` (a Hugging Face LLaMA folder) into `out`, a new
    or empty directory: the base's files as symbolic links, config.json with the
    architecture and `adapter`'s absolute path (the default adapter of every request; V2's
    tuning is folded into the weights when vLLM loads them, and the biases it needs turned on),
    or, without one, the `settings` (SHARED_SETTINGS) of the adapters requests choose."""
    base, out = Path(base), Path(out)
    config = base_config(base)
    if adapter is not None:
        config.update(tuning_config(check_servable(config, adapter, fold=True)))
        llama_adapter = {"path": str(Path(adapter).resolve())}
    elif settings is not None:
        llama_adapter = {k: settings[k] for k in SHARED_SETTINGS}
    else:
        raise ValueError("served_model_folder needs an adapter or the settings of the adapters requests choose")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    config["architectures"] = [ARCHITECTURE]
    config.pop("quantization_config", None)  # a GGUF conversion's record; the weights are dequantized
    config["llama_adapter"] = llama_adapter
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def base_config(base: Path) -> dict:
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ValueError(f"base: {base} has no config.json (a Hugging Face LLaMA folder, or a .gguf file)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"base: {base} is a {config.get('model_type')!r} model; vLLM serves LLaMA-Adapter on "
                         f"LLaMA-architecture bases")
    return config


def lora_folder(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """The LoRA folder that serves `adapter` per request: PEFT's adapter_config.json and a
    rank-1 LoRA of zeros on the first layer's o_proj (it adds exactly nothing: vLLM needs
    some LoRA weight to carry the request's slot), and the adapter file, linked."""
    return write_lora_folder(base_config(Path(base)), adapter, out, str(base))


def write_lora_folder(config: dict, adapter: str | os.PathLike, out: str | os.PathLike, base_name: str = "") -> Path:
    """`lora_folder` for a base described by its config.json `config`."""
    out = Path(out)
    check_servable(config, adapter)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    width = config["hidden_size"]
    heads_width = config["num_attention_heads"] * config.get("head_dim", width // config["num_attention_heads"])
    target = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file({f"{target}.lora_A.weight": torch.zeros(1, heads_width),
               f"{target}.lora_B.weight": torch.zeros(width, 1)}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0, "bias": "none",
        "target_modules": ["o_proj"], "base_model_name_or_path": base_name}, indent=2) + "\n")
    (out / ADAPTER_FILE).symlink_to(Path(adapter).resolve())
    return out


__all__ = ["ADAPTER_FILE", "ARCHITECTURE", "SHARED_SETTINGS", "check_same_settings", "check_servable",
           "lora_folder", "served_model_folder", "write_lora_folder"]
