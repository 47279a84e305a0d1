"""The model folder vLLM serves: the base's files, linked, and a config.json that names the
``LlamaAdapterForCausalLM`` architecture and the adapter file. No vLLM import here."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llama_adapter_fast.models.formats.native import read_adapter, read_adapter_config, with_own_names

ARCHITECTURE = "LlamaAdapterForCausalLM"


def check_servable(base_config: dict, adapter: str | os.PathLike) -> dict:
    """The adapter's settings, after a ValueError naming `adapter` where vLLM's model cannot
    compute it on this base: another base's width or depth, V2's tuning, litgpt's projection."""
    settings = read_adapter_config(adapter)
    if settings.get("bias_tuning") or settings.get("norm_tuning"):
        raise ValueError(f"adapter {adapter}: V2's bias, scale and norm tuning are not served by vLLM yet "
                         f"(prompts and gates only)")
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


def served_model_folder(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the folder vLLM serves for `adapter` on `base` (a Hugging Face LLaMA folder) into
    `out`, a new or empty directory: the base's files as symbolic links, config.json with
    the architecture and the adapter's absolute path."""
    base, out = Path(base), Path(out)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise ValueError(f"base: {base} has no config.json (a Hugging Face LLaMA folder, or a .gguf file)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"base: {base} is a {config.get('model_type')!r} model; vLLM serves LLaMA-Adapter on "
                         f"LLaMA-architecture bases")
    check_servable(config, adapter)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for file in base.iterdir():
        if file.name != "config.json":
            (out / file.name).symlink_to(file.resolve())
    config["architectures"] = [ARCHITECTURE]
    config.pop("quantization_config", None)  # a GGUF conversion's record; the weights are dequantized
    config["llama_adapter"] = {"path": str(Path(adapter).resolve())}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


__all__ = ["ARCHITECTURE", "check_servable", "served_model_folder"]
