"""llama_adapter_fast: fused Triton kernels for LLaMA-Adapter's zero-initialized gated attention."""

import importlib.util
import sys
from pathlib import Path


def _map_checkout_kernels() -> None:
    """Serve the repository's kernels/ folder as llama_adapter_fast.kernels when the package
    runs from a source checkout that was not installed (setup.py maps it when installed), for
    example on a GPU machine that has only torch and triton."""
    name = f"{__name__}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    init = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_map_checkout_kernels()

from llama_adapter_fast.ops import (  # noqa: E402
    concat_attention,
    eager_attention,
    gated_prefix_attention,
    gated_prefix_attention_decode,
    gated_prefix_attention_varlen,
    sdpa_attention,
)

__all__ = [
    "gated_prefix_attention",
    "gated_prefix_attention_varlen",
    "gated_prefix_attention_decode",
    "eager_attention",
    "sdpa_attention",
    "concat_attention",
]
__version__ = "0.1.0"
