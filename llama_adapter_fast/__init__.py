"""llama_adapter_fast: fused Triton kernels for LLaMA-Adapter's zero-initialized gated attention."""

from llama_adapter_fast.attention import gated_prefix_attention
from llama_adapter_fast.reference import concat_attention, eager_attention, sdpa_attention

__all__ = ["gated_prefix_attention", "eager_attention", "sdpa_attention", "concat_attention"]
__version__ = "0.1.0"
