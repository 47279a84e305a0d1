"""Kernels run under Triton's interpreter on machines without a GPU. The variable must be
set before triton is first imported, hence here, before any test module imports it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
    for name in ("transformers", "peft"):
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
