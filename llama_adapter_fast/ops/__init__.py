"""The op: gated prefix attention over padded and packed batches, and its references.

- `attention.py`: `gated_prefix_attention`, its input checks and its backend choice;
- `varlen.py`: `gated_prefix_attention_varlen`, packed sequences;
- `decode.py`: `gated_prefix_attention_decode`, new queries over a KV cache (forward only);
- `custom_ops.py`: the fused kernels as torch.library custom ops with autograd;
- `reference.py`: the eager oracle, the two-SDPA implementation and the concatenated form;
- `testing.py`: the correctness tooling the tests and the GPU check share.
"""

from llama_adapter_fast.ops.attention import (
    BACKENDS,
    deterministic_enabled,
    gated_prefix_attention,
    set_deterministic,
)
from llama_adapter_fast.ops.decode import gated_prefix_attention_decode
from llama_adapter_fast.ops.reference import GATE_ACTIVATIONS, concat_attention, eager_attention, sdpa_attention
from llama_adapter_fast.ops.varlen import gated_prefix_attention_varlen

__all__ = [
    "BACKENDS",
    "GATE_ACTIVATIONS",
    "gated_prefix_attention",
    "gated_prefix_attention_varlen",
    "gated_prefix_attention_decode",
    "eager_attention",
    "sdpa_attention",
    "concat_attention",
    "set_deterministic",
    "deterministic_enabled",
]
