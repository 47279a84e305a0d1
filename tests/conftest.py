"""Kernels run under Triton's interpreter on machines without a GPU. The variable must be
set before triton is first imported, hence here, before any test module imports it."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def op_calls(monkeypatch) -> list:
    """Records the backend of every call of the fused op made by the transformers and PEFT
    integrations (both reach it through llama_adapter_fast.integrations.transformers)."""
    import llama_adapter_fast.integrations.transformers as hf_integration

    calls = []
    op = hf_integration.gated_prefix_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["backend"])
        return op(*args, **kwargs)

    monkeypatch.setattr(hf_integration, "gated_prefix_attention", counted)
    return calls
