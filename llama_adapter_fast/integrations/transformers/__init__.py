"""LLaMA-Adapter on transformers models, through transformers' attention interface.

`add_llama_adapter` gives the top layers of a model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` an adaption prompt and a gate, and switches the model to the
attention implementation registered here under the name ``"llama_adapter_fast"``: causal
LMs (Llama, Mistral, Qwen2 and the like) and encoders (ViT, BERT, RoBERTa, both towers of
CLIP), each layer causal or bidirectional as the model's own attention is. Adapted layers
run `gated_prefix_attention`; the others run plain scaled_dot_product_attention. The
matching mask function (transformers 4.53 and later) hands the kernel a (batch, keys)
padding mask instead of a 4-d mask, for causal and bidirectional masks alike.

- `adapter.py`: add, remove, save and load the adapter;
- `attention.py`: the attention function and its mask function, registered with transformers;
- `tuning.py`: LLaMA-Adapter V2's bias, scale and norm tuning on the model's own layers.

Masks and packed batches are read by `llama_adapter_fast.integrations.masked_attention`,
which the PEFT and litgpt integrations share.
"""

from llama_adapter_fast.integrations.transformers.adapter import (
    add_llama_adapter,
    llama_adapter_state_dict,
    load_llama_adapter,
    remove_llama_adapter,
    save_llama_adapter,
)
from llama_adapter_fast.integrations.transformers.attention import (
    ATTENTION_NAME,
    llama_adapter_attention,
    llama_adapter_mask,
    prefix_keys_values,
    register_attention,
)

__all__ = [
    "ATTENTION_NAME",
    "add_llama_adapter",
    "remove_llama_adapter",
    "llama_adapter_state_dict",
    "save_llama_adapter",
    "load_llama_adapter",
    "register_attention",
    "llama_adapter_attention",
    "llama_adapter_mask",
    "prefix_keys_values",
]
