"""GGUF bases (llama.cpp's file format): a LLaMA-architecture GGUF file, dequantized, as a
Hugging Face folder the rest of the package reads.

transformers reads GGUF files (its `gguf_file=` loading, with the `gguf` package doing the
dequantization, the llama.cpp tensor names and the q/k row order mapped back); what it
returns is a quantization-tagged model that refuses `save_pretrained`, so the weights go
into a plain `LlamaForCausalLM` built from the same config, which is saved with the file's
tokenizer (tokenizer.json, its special tokens and chat template) and generation config.

`gguf_base_folder` converts a file once into a cache folder named by the file's SHA-256 and
the versions of transformers and gguf (`$LLAMA_ADAPTER_FAST_CACHE`, default
`~/.cache/llama_adapter_fast`), so that `--base model.gguf` costs the conversion only the
first time with the same readers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from llama_adapter_fast.files import atomic_folder, file_sha256, first_line

# The architectures whose GGUF files are a LLaMA for this package (llama.cpp names).
ARCHITECTURES = ("llama",)
CACHE_ENV = "LLAMA_ADAPTER_FAST_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _requirements(what: str) -> None:
    missing = [m for m in ("gguf", "transformers", "accelerate") if _absent(m)]
    if missing:
        raise ValueError(f"{what}: reading a GGUF file needs the packages {', '.join(missing)}: "
                         f"pip install {' '.join(missing)}")


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def check_gguf(path: str | os.PathLike, what: str = "base") -> str:
    """The file's architecture, after checking that it is a GGUF file of a LLaMA whose every
    tensor type the `gguf` package can dequantize; a ValueError naming `what` (the argument)
    and the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}: {path} is not a file")
    if not is_gguf(path):
        raise ValueError(f"{what}: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    _requirements(what)
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ValueError(f"{what}: {path}: unreadable GGUF file ({first_line(exc)})") from None
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in ARCHITECTURES:
        raise ValueError(f"{what}: {path} holds a {arch!r} model; this package reads the architectures "
                         f"{', '.join(ARCHITECTURES)}")
    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
    unreadable = sorted({t.tensor_type.name for t in reader.tensors
                         if t.tensor_type not in plain and t.tensor_type not in _type_traits})
    if unreadable:
        raise ValueError(f"{what}: {path} has tensors of the quantization type {', '.join(unreadable)}, which the "
                         f"installed gguf package cannot dequantize")
    return arch


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write the GGUF file at `path` as a Hugging Face folder `out_dir` (config.json,
    model.safetensors in `dtype`, tokenizer files, generation_config.json). The folder
    appears whole or not at all (written beside it, then renamed); an existing folder is
    refused. transformers shows the dequantization's progress bar."""
    path, out = Path(path), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists():
        raise ValueError(f"--out {out} exists: choose a new folder")
    check_gguf(path, "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[dtype])
    except (ValueError, KeyError, NotImplementedError, OSError) as exc:  # what transformers raises for a bad file
        raise ValueError(f"gguf: {path}: transformers cannot read it ({first_line(exc)})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: a plain checkpoint now
    config.dtype = DTYPES[dtype]
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": name, "sha256": file_sha256(path), "dtype": dtype,
                                                     "readers": _reader_versions()}))

    atomic_folder(out, write)
    return out


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama_adapter_fast")


def _reader_versions() -> str:
    """The versions of what reads a GGUF file (transformers and gguf), whose conversions differ
    (transformers 5.0 wrote another vocabulary size and other stop ids for the same file)."""
    from importlib.metadata import version

    return f"transformers {version('transformers')}, gguf {version('gguf')}"


def gguf_base_folder(path: str | os.PathLike) -> Path:
    """The Hugging Face folder of a GGUF file, converted (in float32) the first time into the
    cache and found there afterwards, by the file's SHA-256 and the readers' versions (so an
    edited file, or another transformers or gguf, converts again)."""
    path = Path(path)
    if not is_gguf(path):
        check_gguf(path)  # its error: missing, a folder, not GGUF
    readers = hashlib.sha256(_reader_versions().encode()).hexdigest()[:8]
    folder = cache_root() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}-{readers}"
    if not (folder / "config.json").is_file():
        # Reading the file's header (its whole vocabulary) takes seconds: only before converting.
        check_gguf(path)
        print(f"converting {path} into {folder} (once)")
        try:
            convert_gguf(path, folder)
        except (ValueError, OSError):
            if not (folder / "config.json").is_file():  # another process may have just written it
                raise
    return folder
