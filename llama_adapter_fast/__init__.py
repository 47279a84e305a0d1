"""llama_adapter_fast: fused Triton kernels for LLaMA-Adapter's zero-initialized gated attention."""

from llama_adapter_fast.ops import (
    concat_attention,
    deterministic_enabled,
    eager_attention,
    gated_prefix_attention,
    gated_prefix_attention_decode,
    gated_prefix_attention_varlen,
    sdpa_attention,
    set_deterministic,
)

__all__ = [
    "gated_prefix_attention",
    "gated_prefix_attention_varlen",
    "gated_prefix_attention_decode",
    "eager_attention",
    "sdpa_attention",
    "concat_attention",
    "set_deterministic",
    "deterministic_enabled",
]
__version__ = "0.1.0"
