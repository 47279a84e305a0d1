"""`llama-adapter-fast serve`: an adapter behind vLLM's OpenAI-compatible server.

    llama-adapter-fast serve --base BASE --adapter NAME=FILE [-- VLLM_OPTIONS ...]

The base (a Hugging Face LLaMA folder or a .gguf file, converted once) and the adapter go
into a temporary model folder of the ``LlamaAdapterForCausalLM`` architecture (this
package's vLLM plugin), served under NAME by ``python -m vllm.entrypoints.openai.api_server``
with whatever options follow ``--`` (``--port``, ``--host``, ``--dtype``, ...).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an adapter with vLLM (OpenAI-compatible API)",
                       description=__doc__.split("\n\n")[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a Hugging Face LLaMA folder or a .gguf file")
    p.add_argument("--adapter", required=True, action="append", metavar="NAME=FILE",
                   help="the adapter and the name requests use for it (the request's model field)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER,
                   help="after --: options of vLLM's server (--port 8000, --host 127.0.0.1, --dtype float32, ...)")


def parse_adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter: expected NAME=FILE, got {spec!r}")
    return name, path


def run(args) -> int:
    from pathlib import Path

    from llama_adapter_fast.integrations.vllm import check_vllm, served_model_folder
    from llama_adapter_fast.training.bases import base_folder

    adapters = [parse_adapter(spec) for spec in args.adapter]
    if len(adapters) > 1:
        raise ValueError("--adapter: one adapter per server for now (several adapters in one engine, chosen per "
                         "request, are not built yet); run one server per adapter")
    (name, path), = adapters
    if not Path(path).exists():
        raise ValueError(f"--adapter: {path} does not exist")
    check_vllm()
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    with tempfile.TemporaryDirectory(prefix="llama-adapter-fast-serve-") as tmp:
        folder = served_model_folder(base_folder(args.base), path, Path(tmp) / "model")
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
                   "--served-model-name", name, *extra]
        print("serving", name, "on", args.base, ":", " ".join(command), flush=True)
        try:
            return subprocess.call(command)
        except KeyboardInterrupt:  # the server got the same Ctrl-C and stops by itself
            return 130
