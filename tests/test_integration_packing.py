"""Padding-free batches from transformers' DataCollatorWithFlattening: the adapted
attention of both integrations runs the packed op (not two masked SDPA calls) and gives
what each sequence gives alone (transformers) and what PEFT's own forward gives (PEFT)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import AdaptionPromptConfig, get_peft_model  # noqa: E402
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt  # noqa: E402
from llama_adapter_fast.integrations.transformers import add_llama_adapter, packed_sequences  # noqa: E402
from llama_adapter_fast.testing import expect_launches, rel_error  # noqa: E402

LENGTHS = (7, 19, 1, 12)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def sequences(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 101, (n,), generator=g).tolist() for n in LENGTHS]


def flattened(flash_kwargs: bool) -> dict:
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    return collator([{"input_ids": s} for s in sequences()])


def test_packed_sequences_reads_the_collators_batches():
    for flash_kwargs in (False, True):
        batch = flattened(flash_kwargs)
        found = packed_sequences(batch, 1, sum(LENGTHS), sum(LENGTHS))
        assert found is not None
        cu_q, cu_k, max_q, max_k = found
        assert cu_q.tolist() == cu_k.tolist() == [0, 7, 26, 27, 39] and max_q == max_k == 19
    # One ordinary sequence, a batch of two, or a decoding step is no packing.
    assert packed_sequences({"position_ids": torch.arange(9)[None]}, 1, 9, 9) is None
    assert packed_sequences({"position_ids": torch.tensor([[0, 1, 0, 1]] * 2)}, 2, 4, 4) is None
    assert packed_sequences({"position_ids": torch.tensor([[0, 1, 2, 0]])}, 1, 1, 4) is None
    assert packed_sequences({"position_ids": torch.tensor([[0, 1, 0, 2]])}, 1, 4, 4) is None  # not restarting runs


def _logits_and_grads(model, weight, **inputs):
    model.zero_grad()
    logits = model(**inputs).logits
    (logits.float() * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_transformers_adapter_packs(backend, flash_kwargs, op_calls):
    model = add_llama_adapter(tiny_llama(), adapter_len=4, adapter_layers=2, backend=backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.uniform_(-1, 1)  # non-zero gates: the prefix part counts
    batch = flattened(flash_kwargs)
    weight = torch.randn(1, sum(LENGTHS), 101, generator=torch.Generator().manual_seed(2))
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    kernels = ("forward", "backward_dq", "backward_dkdv") if backend == "triton" else ()
    with expect_launches(*kernels):
        packed, packed_grads = _logits_and_grads(model, weight, **inputs)
    assert len(op_calls) == 2 and all(kw["packed"] for kw in op_calls.kwargs)
    assert set(op_calls) == {backend}
    alone_logits = []
    model.zero_grad()
    start = 0
    for seq in sequences():
        logits = model(input_ids=torch.tensor([seq])).logits
        (logits.float() * weight[:, start:start + len(seq)]).sum().backward()
        alone_logits.append(logits.detach())
        start += len(seq)
    alone = torch.cat(alone_logits, dim=1)
    assert rel_error(packed, alone) < 1e-5
    for name, grad in packed_grads.items():
        assert rel_error(grad, dict(model.named_parameters())[name].grad) < 1e-4, name


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_peft_adaption_prompt_packs(backend, op_calls):
    model = get_peft_model(tiny_llama(), AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.6)
    batch = flattened(False)
    # Without a cache, as in training: transformers then builds the packed 4-d mask that
    # PEFT's own forward (the reference) needs.
    inputs = {k: v for k, v in batch.items() if k != "labels"} | {"use_cache": False}
    weight = torch.randn(1, sum(LENGTHS), 101, generator=torch.Generator().manual_seed(3))
    reference, reference_grads = _logits_and_grads(model, weight, **inputs)  # PEFT's own forward, 4-d mask
    enable_fused_adaption_prompt(model, backend=backend)
    kernels = ("forward", "backward_dq", "backward_dkdv") if backend == "triton" else ()
    with expect_launches(*kernels):
        fused, fused_grads = _logits_and_grads(model, weight, **inputs)
    assert len(op_calls) == 2 and all(kw["packed"] for kw in op_calls.kwargs)
    assert rel_error(fused, reference) < 1e-5
    for name, grad in fused_grads.items():
        assert rel_error(grad, reference_grads[name]) < 1e-4, name
