"""The `llama-adapter-fast` command: finetune, generate, pretrain (a small base) and the demos.

    llama-adapter-fast finetune --base BASE_DIR --data alpaca.json --out runs/adapter
    llama-adapter-fast generate --base BASE_DIR --adapter runs/adapter/adapter.safetensors \\
        --prompt "Give the opposite of the word." --input wet
    llama-adapter-fast convert model.gguf --out BASE_DIR   # a GGUF base as a Hugging Face folder
    llama-adapter-fast serve --base BASE --adapter NAME=FILE -- --port 8000   # vLLM's server
    llama-adapter-fast demo     # everything on a tiny model and the bundled data, CPU-sized
    llama-adapter-fast demo-mm  # the multi-modal adapter: questions about pictures
    llama-adapter-fast demo-real  # a real pretrained model (SmolLM2-135M-Instruct, GGUF)

Several GPUs or machines: torchrun --nproc_per_node 8 -m llama_adapter_fast.cli finetune ...

One module per command (`finetune.py`, `generate.py`, `convert.py`, `pretrain.py`, `serve.py`, `demos/`), each with
`add_parser(subparsers)` and `run(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import sys

from llama_adapter_fast.cli import convert, finetune, generate, pretrain, serve
from llama_adapter_fast.cli.demos import multimodal, real, text

COMMANDS = {"finetune": finetune, "generate": generate, "convert": convert, "pretrain": pretrain, "serve": serve,
            "demo": text, "demo-mm": multimodal, "demo-real": real}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llama-adapter-fast", description=__doc__.split("\n\nOne module")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return COMMANDS[a.command].run(a)
    except ValueError as exc:
        # Bad input (a malformed data file, a wrong path, a bad option) ends with its message,
        # not a traceback. Set LLAMA_ADAPTER_FAST_DEBUG=1 to see the traceback.
        import os

        if os.environ.get("LLAMA_ADAPTER_FAST_DEBUG"):
            raise
        print(f"llama-adapter-fast {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Training has already said where its checkpoint is; the traceback would only bury it.
        print(f"llama-adapter-fast {a.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`generate ... | head`): stop quietly, as Unix tools do.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE
