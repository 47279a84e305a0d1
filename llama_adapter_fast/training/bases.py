"""The base model and tokenizer a command loads: Hugging Face or Meta folders and GGUF files."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from llama_adapter_fast.models import LLaMAAdapter
from llama_adapter_fast.models.formats.gguf import check_gguf, gguf_base_folder, is_gguf
from llama_adapter_fast.training.tokenizer import HFTokenizer, Tokenizer, open_tokenizer


def base_format(path: str | os.PathLike) -> str:
    """"hf" for a Hugging Face folder (config.json), "meta" for Meta's (params.json), "gguf"
    for a GGUF file."""
    folder = Path(path)
    if folder.is_file():
        if not is_gguf(folder):
            check_gguf(folder)  # its error, naming the file
        return "gguf"  # the whole check comes before a conversion (gguf_base_folder)
    if (folder / "config.json").is_file():
        return "hf"
    if (folder / "params.json").is_file():
        return "meta"
    raise ValueError(f"base: {folder} is neither a GGUF file nor a folder with config.json (Hugging Face) or "
                     f"params.json (Meta)")


def base_folder(path: str | os.PathLike) -> Path:
    """The folder to load a base from: the path itself, or for a GGUF file the Hugging Face
    folder it is converted into once (see models.gguf)."""
    return gguf_base_folder(path) if base_format(path) == "gguf" else Path(path)


def load_base(path: str | os.PathLike, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None, known_format: str | None = None, quantize: str | None = None,
              **adapter: Any) -> LLaMAAdapter:
    """A Hugging Face folder (config.json), a Meta folder (params.json) or a GGUF file
    (dequantized, then cast to `dtype` if given), its linear layers quantized by `quantize`
    (nf4, fp4, int8, torchao-int8; a GGUF base is re-quantized from its dequantized weights).
    `known_format`: `base_format(path)`, where the caller has already checked it."""
    fmt = known_format or base_format(path)
    folder = gguf_base_folder(path) if fmt == "gguf" else Path(path)
    loader = LLaMAAdapter.from_meta if fmt == "meta" else LLaMAAdapter.from_hf
    return loader(folder, device=device, dtype=dtype, quantize=quantize, **adapter)


def load_tokenizer(path: str | None, base: str | None) -> Tokenizer | HFTokenizer:
    """`path` if given, else the base folder's tokenizer (tokenizer.model or tokenizer.json),
    else (no base) the bundled one."""
    if path is not None:
        return open_tokenizer(path)
    if base is None:
        return open_tokenizer(None)
    folder = gguf_base_folder(base) if Path(base).is_file() else Path(base)
    if not ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        raise ValueError(f"base: {base} has no tokenizer.model or tokenizer.json: pass the base model's tokenizer "
                         f"with --tokenizer")
    return open_tokenizer(folder)


def check_vocabulary(tokenizer: Tokenizer | HFTokenizer, vocab_size: int) -> None:
    """A tokenizer whose ids the model's embedding cannot hold is the wrong one for the base;
    one that uses much less of the vocabulary than the base has (models pad theirs by a few
    rows at most) most likely is, and is warned about."""
    if tokenizer.n_words > vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.n_words} tokens, more than the model's "
                         f"vocab_size {vocab_size}: wrong tokenizer for this base?")
    if tokenizer.n_words < 0.9 * vocab_size:
        print(f"warning: tokenizer {tokenizer.path} has {tokenizer.n_words} tokens, far fewer than the model's "
              f"vocab_size {vocab_size}: is it the base's own tokenizer? (its ids would mean other words to the "
              f"model)", file=sys.stderr)


__all__ = ["base_format", "base_folder", "load_base", "load_tokenizer", "check_vocabulary"]
