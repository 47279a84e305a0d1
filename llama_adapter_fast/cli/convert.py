"""`llama-adapter-fast convert`: a GGUF file as a Hugging Face folder, once."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="write a GGUF base (llama.cpp) as a Hugging Face folder",
                       description="Dequantize a LLaMA GGUF file into a Hugging Face folder (config.json, "
                                   "model.safetensors, its tokenizer.json, chat template and generation config) that "
                                   "finetune and generate take as --base. (--base model.gguf also works: it converts "
                                   "once into a cache.)")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="the new folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32)")


def run(a: argparse.Namespace) -> int:
    from llama_adapter_fast.models.gguf import convert_gguf

    print(f"base model: {convert_gguf(a.gguf, a.out, dtype=a.dtype)}")
    return 0
