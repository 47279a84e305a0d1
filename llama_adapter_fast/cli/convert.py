"""`llama-adapter-fast convert`: a GGUF base as a Hugging Face folder, or an adapter from one
format to another (this package's file, PEFT's adaption-prompt folder, litgpt's checkpoints,
the original V1 and V2 releases' .pth)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

ADAPTER_TARGETS = ("llama-adapter-fast", "peft", "litgpt", "original")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="a GGUF base as a Hugging Face folder; an adapter into another format",
                       description="With a .gguf file: dequantize a LLaMA GGUF file into a Hugging Face folder "
                                   "(config.json, model.safetensors, its tokenizer.json, chat template and generation "
                                   "config) that finetune and generate take as --base (--base model.gguf also works: "
                                   "it converts once into a cache). With an adapter (this package's .safetensors or "
                                   "checkpoint.pt, a PEFT adaption-prompt folder, a litgpt adapter or adapter_v2 "
                                   "checkpoint, an original LLaMA-Adapter V1 or V2 .pth): "
                                   "write it as --to says, refusing what the target format cannot hold.")
    p.add_argument("source", help="a .gguf base, or an adapter file or PEFT folder")
    p.add_argument("--out", required=True, help="the new folder (a base, a PEFT adapter), .safetensors or .pth file")
    p.add_argument("--to", default="llama-adapter-fast", choices=ADAPTER_TARGETS,
                   help="an adapter's target format (default: this package's .safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="a GGUF base: dtype of the written weights (default float32)")
    p.add_argument("--base-model", default=None, help="--to peft: the base_model_name_or_path PEFT records")
    p.add_argument("--overwrite", action="store_true",
                   help="an adapter conversion: replace an existing --out (never the source itself)")
    g = p.add_argument_group("an original LLaMA-Adapter .pth",
                             "it records neither length nor layers: read from its gates unless given")
    g.add_argument("--adapter-len", type=int, default=None)
    g.add_argument("--adapter-layers", type=int, default=None)
    g.add_argument("--gate-activation", default=None, choices=["tanh", "identity"])


def check_out(source: str, out: str, overwrite: bool) -> None:
    """A conversion writes neither onto its source (or inside a source folder) nor over an
    existing file or folder unless asked to (overwrite)."""
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or src in dst.parents:
        raise ValueError(f"--out {out} is the source {source}: a conversion never writes onto its input")
    if dst.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: choose another path, or pass --overwrite to replace it")


class Conversion(NamedTuple):
    """A written adapter, and what training recorded with its source (template, tokenizer)
    that its format cannot hold: generation must be told them again."""

    path: Path
    dropped: dict[str, str]


def convert_adapter(source: str, out: str, to: str = "llama-adapter-fast", base_model: str | None = None,
                    overwrite: bool = False, **given) -> Conversion:
    """Read an adapter in any format this package reads and write it in `to`; a ValueError
    naming what would be lost where the target cannot hold it (nothing is written then), or
    where `out` is the source or exists (unless `overwrite`). `given` (adapter_len,
    adapter_layers, gate_activation) completes an original file. What training recorded
    (template, tokenizer) goes with it into this package's format; the others drop it."""
    from llama_adapter_fast.models.formats.litgpt import write_litgpt_adapter
    from llama_adapter_fast.models.formats.native import (
        RECORDED_FIELDS,
        adapter_config,
        read_adapter,
        with_own_names,
        write_adapter_file,
    )
    from llama_adapter_fast.models.formats.original import write_original_adapter
    from llama_adapter_fast.models.formats.peft import write_peft_adapter

    if to not in ADAPTER_TARGETS:
        raise ValueError(f"to must be one of {ADAPTER_TARGETS}, got {to!r}")
    check_out(source, out, overwrite)
    adapter = read_adapter(source)  # once: its tensors, settings and record
    settings = adapter_config(adapter, **given)
    state = with_own_names(adapter.state, settings["adapter_layers"])
    recorded = {k: v for k, v in adapter.metadata.items() if k in RECORDED_FIELDS}
    if to == "peft":
        write_peft_adapter(out, state, settings, base_model)
    elif to == "litgpt":
        write_litgpt_adapter(out, state, settings)
    elif to == "original":
        write_original_adapter(out, state, settings)
    if to != "llama-adapter-fast":  # these formats hold no record
        return Conversion(Path(out), {k: v for k, v in recorded.items() if k != "base" and v})
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"--out {out}: this package's adapter files end in .safetensors")
    config = dict(settings)
    if "bias_tuning" in config:
        config["bias_tuning"] = list(config["bias_tuning"])
    write_adapter_file(out, state, config, {**recorded, "converted_from": str(source)})
    return Conversion(Path(out), {})


def run(a: argparse.Namespace) -> int:
    from llama_adapter_fast.models.formats.gguf import convert_gguf, is_gguf

    if a.source.endswith(".gguf") or is_gguf(a.source):
        print(f"base model: {convert_gguf(a.source, a.out, dtype=a.dtype)}")
        return 0
    given = {"adapter_len": a.adapter_len, "adapter_layers": a.adapter_layers, "gate_activation": a.gate_activation}
    path, dropped = convert_adapter(a.source, a.out, a.to, a.base_model, overwrite=a.overwrite, **given)
    print(f"adapter: {path} ({a.to} format)")
    if dropped:
        shown = ", ".join(f"{k} {v[:16]}" for k, v in dropped.items())
        print(f"note: the {a.to} format cannot hold what training recorded ({shown}): generate with the same "
              f"--template and tokenizer", file=sys.stderr)
    return 0
