"""The private parts of vLLM that adapters chosen per request rely on, all here.

vLLM carries a request's adapter through its LoRA path: the request names a LoRA adapter
(`LoRARequest`, or the OpenAI `model` field of a `--lora-modules` name), vLLM's worker loads
it into one of `max_loras` slots, and each step's per-token slot index reaches the LoRA
layers through their punica wrapper (`token_lora_indices`, public on the wrapper). A
LLaMA-Adapter is served as a LoRA adapter of zero weights whose folder also holds the
adapter file (see `folder.lora_folder`); two hooks tell the model which adapter is where:

- `WorkerLoRAManager._load_adapter(lora_request)`: lets the model check the adapter first
  (and turn an adapter file into its LoRA folder, so that vLLM's `/v1/load_lora_adapter`
  takes the file itself), then records the folder of each LoRA id;
- `LoRAModelManager._set_adapter_mapping(mapping)`: after each mapping update, hands the
  model the LoRA id of every slot (`lora_index_to_id`).

Both act only for a model that asks for them (`llama_adapter_slots`); vLLM's other models
are untouched. They are tested with the vLLM versions in `TESTED_VLLM`.
"""

from __future__ import annotations

import functools

# LoRA id -> the adapter folder it was loaded from, in this (worker) process.
LORA_FOLDERS: dict[int, str] = {}
_INSTALLED = False


def install() -> None:
    """Wrap the two methods (once per process)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    load_adapter = WorkerLoRAManager._load_adapter
    set_adapter_mapping = LoRAModelManager._set_adapter_mapping

    @functools.wraps(load_adapter)
    def _load_adapter(self, lora_request):
        prepare = getattr(self._adapter_manager.model, "llama_adapter_lora_path", None)
        if prepare is not None:  # a refusal here reaches the client as an error response
            lora_request.lora_path = prepare(lora_request.lora_int_id, lora_request.lora_path)
        lora = load_adapter(self, lora_request)
        LORA_FOLDERS[lora_request.lora_int_id] = lora_request.lora_path
        return lora

    @functools.wraps(set_adapter_mapping)
    def _set_adapter_mapping(self, mapping):
        set_adapter_mapping(self, mapping)
        slots = getattr(self.model, "llama_adapter_slots", None)
        if slots is not None:
            slots(list(self.lora_index_to_id))

    WorkerLoRAManager._load_adapter = _load_adapter
    LoRAModelManager._set_adapter_mapping = _set_adapter_mapping
    _INSTALLED = True


__all__ = ["LORA_FOLDERS", "install"]
