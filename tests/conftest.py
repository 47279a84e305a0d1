"""Kernels run under Triton's interpreter on machines without a GPU. The variable must be
set before triton is first imported, hence here, before any test module imports it."""

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs the kernels on CPU tensors under Triton's interpreter (or "
                                       "checks its own settings); skipped where a GPU compiles the kernels")


def pytest_collection_modifyitems(config, items):
    """On a machine with a GPU the kernels compile and run there: the tests that need the
    interpreter (CPU tensors through backend="triton", its emulation of tf32x3, its block
    sizes) do not apply, and say so."""
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs Triton's interpreter: on a GPU the kernels compile and run there")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)


class OpCalls(list):
    """The backend of every call of the fused op, in order; `kwargs` holds each call's
    keyword arguments (causal, key_padding_mask, ...) and whether it was the packed op
    ("packed")."""

    def __init__(self) -> None:
        super().__init__()
        self.kwargs: list[dict] = []


@pytest.fixture
def op_calls(monkeypatch) -> OpCalls:
    """Records every call of the fused op made by the transformers and PEFT integrations
    (the modules of llama_adapter_fast.integrations that call it)."""
    import importlib

    calls = OpCalls()
    for name in ("masked_attention", "peft"):
        try:
            module = importlib.import_module(f"llama_adapter_fast.integrations.{name}")
        except ImportError:  # the optional library is not installed
            continue
        for op_name in ("gated_prefix_attention", "gated_prefix_attention_varlen"):
            op = getattr(module, op_name, None)
            if op is None:
                continue
            packed = op_name.endswith("varlen")

            def counted(*args, _op=op, _packed=packed, **kwargs):
                calls.append(kwargs["backend"])
                calls.kwargs.append({**kwargs, "packed": _packed})
                return _op(*args, **kwargs)

            monkeypatch.setattr(module, op_name, counted)
    return calls


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a Hugging Face folder, with the bundled tokenizer."""
    from llama_adapter_fast.bundled import TOKENIZER
    from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
    from llama_adapter_fast.training.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=Tokenizer().n_words, multiple_of=16,
                                   max_seq_len=96, adapter_layers=0))
    model.save_hf(folder)
    shutil.copy(TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """The first 24 of the bundled instructions."""
    from llama_adapter_fast.bundled import SYNTHETIC_FILES

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = SYNTHETIC_FILES["train"].read_text().splitlines()[:24]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def encoder_dir(tmp_path) -> Path:
    """A tiny CLIP vision tower with its image processor, saved as a Hugging Face folder."""
    from support.tiny_clip import tiny_encoder

    folder = tmp_path / "encoder"
    tiny_encoder().save_pretrained(folder)
    return folder
