"""Install metadata for llama-adapter-fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and are
installed as the subpackage ``llama_adapter_fast.kernels`` (never as a top-level
``kernels`` module, a name that belongs to another package on the index).
"""

from setuptools import setup

setup(
    name="llama-adapter-fast",
    version="0.1.0",
    description="Fused Triton kernels for LLaMA-Adapter's zero-initialized gated attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "llama_adapter_fast",
        "llama_adapter_fast.ops",
        "llama_adapter_fast.models",
        "llama_adapter_fast.training",
        "llama_adapter_fast.integrations",
        "llama_adapter_fast.integrations.transformers",
        "llama_adapter_fast.cli",
        "llama_adapter_fast.cli.demos",
        "llama_adapter_fast.kernels",
    ],
    package_dir={
        "llama_adapter_fast": "llama_adapter_fast",
        "llama_adapter_fast.kernels": "kernels",
    },
    install_requires=[
        "torch>=2.5",
        "numpy",
        "triton>=3.2; sys_platform == 'linux'",
        "sentencepiece",
        "tokenizers>=0.19",  # a base's tokenizer.json (Llama 3, SmolLM)
        "safetensors",
        "tqdm",
        "matplotlib",
        "pillow",
    ],
    entry_points={"console_scripts": ["llama-adapter-fast = llama_adapter_fast.cli:main"]},
    package_data={"llama_adapter_fast": ["assets/tokenizer.model", "assets/synthetic/*.jsonl", "assets/shapes/*.jsonl",
                                         "assets/shapes/*.png", "assets/shapes/images/*.png"]},
    include_package_data=True,
    extras_require={
        # Triton 3.6's interpreter converts 1-element arrays with int(), which numpy 2.4 rejects.
        "test": ["pytest>=7", "hypothesis>=6", "ruff", "numpy<2.4"],
        "bench": ["matplotlib", "tqdm", "transformers>=4.48", "peft>=0.14"],
        # gguf: GGUF bases (transformers reads them with it)
        "hf": ["transformers>=4.48", "peft>=0.14", "safetensors", "accelerate", "gguf>=0.10"],
        # litgpt's adapter and adapter_v2 models through the fused op (0.5.13's seam and tests)
        "litgpt": ["litgpt>=0.5.13"],
    },
)
