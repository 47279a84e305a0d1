"""File formats, one module each: what reads and writes them.

Base checkpoints:
- `hf_meta.py`: Hugging Face folders (config.json, safetensors) and Meta's format (params.json,
  consolidated.*.pth), read into `ModelArgs` and a state dict and written back;
- `gguf.py`: llama.cpp's GGUF files, converted once into a Hugging Face folder.

Adapter files:
- `native.py`: this package's .safetensors (settings in its metadata), .pt dicts and training
  checkpoints, and the dispatch that reads every other adapter format through the modules below;
- `peft.py`: PEFT's adaption-prompt folders;
- `litgpt.py`: litgpt's adapter and adapter_v2 checkpoints;
- `original.py`: the original LLaMA-Adapter V1 and V2 releases.
"""
