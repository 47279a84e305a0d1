"""The models: the one-file LLaMA with LLaMA-Adapter, the multi-modal adapter and its image
encoder, the base checkpoint formats and the adapter files.

- `config.py`: `ModelArgs`;
- `llama.py`: `LLaMAAdapter` and its blocks, `KVCache`;
- `adapter_bank.py`: `AdapterBank`, several adapters over one base in one batch;
- `rope.py`: rotary position embeddings;
- `quantized.py`: a frozen base in 4 or 8 bits (bitsandbytes);
- `tuning.py`: LLaMA-Adapter V2's bias, scale and norm tuning (`TunedLinear`);
- `formats/`: every file format, one module each: base checkpoints (Hugging Face, Meta, GGUF)
  and adapter files (this package's, PEFT, litgpt, the original releases);
- `multimodal.py`: `MultiModalLLaMAAdapter`, images as per-sample prompts;
- `vision.py`: the frozen CLIP encoder (transformers' CLIPVisionModel), preprocessing, feature cache.
"""

from llama_adapter_fast.models.adapter_bank import AdapterBank
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import KVCache, LLaMAAdapter

__all__ = ["ModelArgs", "LLaMAAdapter", "KVCache", "AdapterBank"]
