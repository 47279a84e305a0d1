"""Padding-free batches from transformers' DataCollatorWithFlattening: the adapted
attention of both integrations runs the packed op (not two masked SDPA calls) and gives
what each sequence gives alone (transformers) and what PEFT's own forward gives (PEFT)."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import AdaptionPromptConfig, get_peft_model
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from llama_adapter_fast.integrations.masked_attention import masked_attention, packed_sequences, resolve_packing
from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt
from llama_adapter_fast.integrations.transformers import add_llama_adapter
from llama_adapter_fast.ops.testing import expect_launches, rel_error

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
    # Multi-axis positions (one row per rope section) are not a packing of one row.
    assert packed_sequences({"position_ids": torch.tensor([0, 1, 0, 1]).expand(3, 1, 4)}, 1, 4, 4) is None
    # Encoders attend across the row whatever their position_ids: no packing there (the
    # flash-attention kwargs are explicit, and count).
    assert packed_sequences(flattened(False), 1, sum(LENGTHS), sum(LENGTHS), causal=False) is None
    assert packed_sequences(flattened(True), 1, sum(LENGTHS), sum(LENGTHS), causal=False) is not None
    # A sliding window that bites inside a sequence turns the packing into a 4-d mask of the
    # packing and the window, which is transformers' own mask of the packed row.
    batch, L = flattened(False), sum(LENGTHS)
    packing, mask = resolve_packing(batch, None, 1, L, L, sliding_window=18)
    assert packing is None and mask.shape == (1, 1, L, L)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(LENGTHS))
    pos = batch["position_ids"][0]
    expected = (seq[:, None] == seq[None]) & (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - 18)
    assert torch.equal(mask[0, 0], expected)
    packing, mask = resolve_packing(batch, None, 1, L, L, sliding_window=19)
    assert packing is not None and mask is None


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
    kernels = ("forward", "backward_prefix", "backward") if backend == "triton" else ()
    with expect_launches(*kernels, times=2):  # each of the two adapted layers once
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
    kernels = ("forward", "backward_prefix", "backward") if backend == "triton" else ()
    with expect_launches(*kernels, times=2):  # each of the two adapted layers once
        fused, fused_grads = _logits_and_grads(model, weight, **inputs)
    assert len(op_calls) == 2 and all(kw["packed"] for kw in op_calls.kwargs)
    assert rel_error(fused, reference) < 1e-5
    for name, grad in fused_grads.items():
        assert rel_error(grad, reference_grads[name]) < 1e-4, name


def tiny_mistral(sliding_window: int) -> MistralForCausalLM:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window,
                           attn_implementation="sdpa")
    return MistralForCausalLM(config)


def _each_sequence_alone(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([seq]), use_cache=False).logits for seq in sequences()], 1)


@pytest.mark.parametrize("window, packed_op", [(5, False), (24, True)])
def test_sliding_windows_hold_in_packed_batches(window, packed_op, op_calls):
    """A window shorter than a packed sequence is honoured through transformers' 4-d mask
    (which holds the window and the packing); one that never bites inside a sequence
    leaves the packed op in charge, though the packed row is longer than the window."""
    inputs = {k: v for k, v in flattened(False).items() if k != "labels"} | {"use_cache": False}
    model = add_llama_adapter(tiny_mistral(window), adapter_len=4, adapter_layers=2, backend="sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.uniform_(-1, 1)
        packed = model(**inputs).logits
    assert len(op_calls) == (2 if packed_op else 0) and all(kw["packed"] for kw in op_calls.kwargs)
    assert rel_error(packed, _each_sequence_alone(model)) < 1e-5

    peft_model = get_peft_model(tiny_mistral(window),
                                AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.6)
        reference = peft_model(**inputs).logits  # PEFT's own forward
        enable_fused_adaption_prompt(peft_model, backend="sdpa")
        fused = peft_model(**inputs).logits
    assert rel_error(fused, reference) < 1e-5


def test_dropout_over_packed_sequences_without_a_mask_is_refused():
    """The packed path has no dropout, and the dropout path without a 4-d mask would let the
    sequences see each other."""
    q = k = v = torch.randn(1, 2, 6, 8)
    packing = packed_sequences({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}, 1, 6, 6)
    with pytest.raises(ValueError, match="dropout.*packed sequences needs a 4-d attention mask"):
        masked_attention(q, k, v, attention_mask=None, dropout=0.1, packing=packing)


@pytest.mark.parametrize("use_cache", [None, True, False])
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_a_window_that_bites_keeps_packed_sequences_apart_with_a_cache(use_cache, flash_kwargs, op_calls):
    """Four sequences of 5, 1, 9 and 4 tokens in one row, a window of 6: whatever the cache
    (transformers' 4-d mask carries no packing when there is one), every sequence gives
    what it gives alone, in train mode too."""
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (5, 1, 9, 4)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": s} for s in seqs])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if use_cache is not None:
        inputs["use_cache"] = use_cache
    model = add_llama_adapter(tiny_mistral(6), adapter_len=4, adapter_layers=2, backend="sdpa").train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaption_gate"):
                p.uniform_(-1, 1)
        packed = model(**inputs).logits
        alone = torch.cat([model(input_ids=torch.tensor([s]), use_cache=False).logits for s in seqs], 1)
    assert rel_error(packed, alone) < 1e-5
