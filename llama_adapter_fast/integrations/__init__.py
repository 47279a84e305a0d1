"""Integrations of the fused gated prefix attention with other libraries.

- `llama_adapter_fast.integrations.peft`: `enable_fused_adaption_prompt` runs PEFT's
  adaption prompts (``AdaptionPromptConfig`` on Llama, Mistral and GPT-2) through the fused op.
- `llama_adapter_fast.integrations.transformers`: `add_llama_adapter` turns a transformers
  causal LM or encoder (ViT, BERT, RoBERTa, CLIP) into a LLaMA-Adapter whose attention goes
  through the op, registered as a transformers attention implementation.
- `llama_adapter_fast.integrations.litgpt`: `enable_fused_adapter` runs litgpt's adapter and
  adapter_v2 models (``litgpt.adapter.GPT``, ``litgpt.adapter_v2.GPT``) through the fused op.

- `llama_adapter_fast.integrations.masked_attention`: what the three share, a library's
  attention call under its mask (and packed batches) into the op.

The submodules import transformers and peft, or litgpt, which are optional dependencies
(``pip install llama-adapter-fast[hf]``, ``[litgpt]``), so nothing is imported here.
"""
