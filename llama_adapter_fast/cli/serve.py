"""`llama-adapter-fast serve`: adapters behind vLLM's OpenAI-compatible server.

    llama-adapter-fast serve --base BASE --adapter NAME=FILE [--adapter NAME=FILE ...] [-- VLLM_OPTIONS ...]

The base (a Hugging Face LLaMA folder or a .gguf file, converted once) goes into a temporary
model folder of the ``LlamaAdapterForCausalLM`` architecture (this package's vLLM plugin),
served under its own name (--base-name, default the base's file or folder name), and each
adapter into a LoRA folder served under its NAME: a request's ``model`` field chooses the
adapter, or the base, and one batch mixes them. ``python -m vllm.entrypoints.openai.api_server``
runs it, with vLLM's LoRA path on and whatever options follow ``--`` (``--port``, ``--host``,
``--dtype``, ...). An adapter with V2's bias, scale or norm tuning changes the base's own
weights: it is served alone, under its NAME, its tuning folded into the weights.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an adapter with vLLM (OpenAI-compatible API)",
                       description=__doc__.split("\n\n")[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a Hugging Face LLaMA folder or a .gguf file")
    p.add_argument("--adapter", required=True, action="append", metavar="NAME=FILE",
                   help="an adapter and the name requests use for it (the request's model field); repeatable")
    p.add_argument("--base-name", default=None, help="the name requests use for the base alone")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after --: options of vLLM's server (--port 8000, --host 127.0.0.1, --dtype float32, ...)")


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter: expected NAME=FILE, got {spec!r}")
    return name, path


def run(args) -> int:
    from pathlib import Path

    from llama_adapter_fast.integrations.vllm import check_vllm, lora_folder, served_model_folder
    from llama_adapter_fast.integrations.vllm.fold import has_tuning
    from llama_adapter_fast.integrations.vllm.folder import check_same_settings
    from llama_adapter_fast.models.formats.native import read_adapter_config
    from llama_adapter_fast.training.bases import base_folder

    adapters = [parse_adapter(spec) for spec in args.adapter]
    base_name = args.base_name or Path(args.base).name.removesuffix(".gguf")
    names = [name for name, _ in adapters] + [base_name]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter: every adapter and the base (--base-name {base_name!r}) need a name of their "
                         f"own, got {names}")
    for _, path in adapters:
        if not Path(path).exists():
            raise ValueError(f"--adapter: {path} does not exist")
    settings = read_adapter_config(adapters[0][1])
    tuned = [path for _, path in adapters if has_tuning(read_adapter_config(path))]
    if tuned and (len(adapters) > 1 or args.base_name):
        raise ValueError(f"--adapter: {tuned[0]} has V2's bias, scale or norm tuning, which is folded into the "
                         f"served weights: serve it alone (one --adapter, no --base-name)")
    for _, path in adapters[1:]:
        check_same_settings(settings, read_adapter_config(path), path)
    check_vllm()
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    with tempfile.TemporaryDirectory(prefix="llama-adapter-fast-serve-") as tmp:
        base = base_folder(args.base)
        server = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        if tuned:  # the adapter is the model: its tuning folded into the weights, no base, no LoRA
            (name, path), = adapters
            folder = served_model_folder(base, path, Path(tmp) / "model")
            command = [*server, "--model", str(folder), "--served-model-name", name, *extra]
            served = f"{name} (its V2 tuning folded into the weights)"
        else:
            folder = served_model_folder(base, None, Path(tmp) / "model", settings=settings)
            loras = [f"{name}={lora_folder(base, path, Path(tmp) / 'adapters' / name)}" for name, path in adapters]
            command = [*server, "--model", str(folder), "--served-model-name", base_name, "--enable-lora",
                       "--max-loras", str(len(adapters)), "--max-lora-rank", "8", "--lora-modules", *loras, *extra]
            served = f"{', '.join(n for n, _ in adapters)} and the base as {base_name!r}"
        print(f"serving {served}:", " ".join(command), flush=True)
        # vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter: adapters come and go
        # while it runs (a request's lora_path may be an adapter file itself).
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        try:
            return subprocess.call(command, env=env)
        except KeyboardInterrupt:  # the server got the same Ctrl-C and stops by itself
            return 130
