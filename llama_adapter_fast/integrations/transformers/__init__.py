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
- `masks.py`: transformers' masks read as causal attention plus key padding (shared with
  the PEFT integration), and masked SDPA where a mask is something else;
- `packing.py`: packed batches (DataCollatorWithFlattening) read as the packed op's cu_seqlens.
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
from llama_adapter_fast.integrations.transformers.masks import (
    check_sliding_window,
    masked_attention,
    masked_gated_prefix_attention,
    resolve_attention_mask,
)
from llama_adapter_fast.integrations.transformers.packing import packed_sequences, packing_mask, resolve_packing

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
    "masked_gated_prefix_attention",
    "masked_attention",
    "check_sliding_window",
    "resolve_attention_mask",
    "packed_sequences",
    "packing_mask",
    "resolve_packing",
]
