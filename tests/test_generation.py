"""Generation: the KV cache against recomputing everything, batching of prompts of
different lengths, EOS, sampling, and the prefix computed once per call."""

from __future__ import annotations

import warnings

import pytest
import torch

from llama_adapter_fast.generation import ContextLimitWarning, answer, generate, sample_next
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.ops import attention
from llama_adapter_fast.ops.testing import DEVICE, expect_launches
from llama_adapter_fast.training.data import format_prompt
from llama_adapter_fast.training.tokenizer import Tokenizer

PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 3], [1, 8, 8, 4, 30, 11, 12, 6, 21, 40]]


def model(dtype=torch.float64, **kw) -> LLaMAAdapter:
    """A random model with open gates (float64 so that argmax ties cannot flip)."""
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=16, max_seq_len=64,
                adapter_len=4, adapter_layers=2, attention_backend="sdpa")
    args.update(kw)
    m = LLaMAAdapter(ModelArgs(**args)).to(dtype).eval()
    with torch.no_grad():
        for attn in m.adapter_layers():
            attn.gate.uniform_(-1.5, 1.5)
    return m


def reference_decode(m: LLaMAAdapter, prompt: list[int], steps: int, eos_id: int | None = None) -> list[int]:
    """Greedy decoding the slow way, written apart from `generate`: one prompt, the whole
    sequence through the model at every step, the argmax of the last position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(m(torch.tensor([seq]))[0, -1].argmax())
            if token == eos_id:
                break
            seq.append(token)
    return seq[len(prompt):]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cached_generation_equals_recomputing_the_whole_sequence(backend):
    m = model(attention_backend=backend)
    cached = generate(m, PROMPTS, max_new_tokens=10)
    full = generate(m, PROMPTS, max_new_tokens=10, use_cache=False)
    assert cached == full == [reference_decode(m, p, 10) for p in PROMPTS]
    assert all(len(row) == 10 for row in cached)
    # Sampling draws the same tokens from the same generator.
    kw = dict(max_new_tokens=10, temperature=0.9, top_p=0.8)
    sampled = generate(m, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    sampled_full = generate(m, PROMPTS, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert sampled == sampled_full
    assert sampled != cached  # the sampling path really sampled


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
    m = model()
    batched = generate(m, PROMPTS, max_new_tokens=8)
    alone = [generate(m, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert batched == alone


def test_cached_logits_match_the_full_forward():
    m = model(dtype=torch.float32)
    seq = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        full = m(seq)
        from llama_adapter_fast.models.llama import KVCache

        cache = KVCache(m, 1, seq.shape[1])
        parts = [m(seq[:, :4], cache=cache), m(seq[:, 4:7], cache=cache)]
        parts += [m(seq[:, t:t + 1], cache=cache) for t in range(7, seq.shape[1])]
    stepwise = torch.cat(parts, dim=1)
    assert torch.allclose(stepwise, full, atol=1e-5, rtol=1e-5)


def test_stops_at_eos():
    m = model()
    free = generate(m, PROMPTS, max_new_tokens=8)
    eos = free[0][3]  # a token the first prompt produces at step 4
    stopped = generate(m, PROMPTS, max_new_tokens=8, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos)]
    for row, ref in zip(stopped, free, strict=True):
        assert row == (ref[:ref.index(eos)] if eos in ref else ref)


def test_prefix_is_computed_once_per_call():
    m = model()
    calls = []
    for attn in m.adapter_layers():
        # The prompt is the only 2-d input of wk: count those calls.
        attn.wk.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].dim()))
    generate(m, PROMPTS, max_new_tokens=6)
    assert calls.count(2) == len(m.adapter_layers())
    calls.clear()
    generate(m, PROMPTS, max_new_tokens=6, use_cache=False)
    assert calls.count(2) == 6 * len(m.adapter_layers())  # the uncached path recomputes at every step


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0], [5.0, 0.0, 0.0, 4.9]])
    assert sample_next(logits).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    # top_p small keeps only the most likely token.
    for _ in range(5):
        assert sample_next(logits, temperature=1.0, top_p=0.05, generator=g).tolist() == [1, 0]
    draws = {tuple(sample_next(logits, temperature=5.0, generator=g).tolist()) for _ in range(50)}
    assert len(draws) > 1


def test_answer_with_the_bundled_tokenizer():
    tok = Tokenizer()
    m = model(dtype=torch.float32, vocab_size=tok.n_words)
    out = answer(m, tok, ["Give the opposite of the word.", {"instruction": "What colour is this?", "input": "sky"}],
                 max_new_tokens=6, batch_size=2)
    prompts = [format_prompt("Give the opposite of the word."), format_prompt("What colour is this?", "sky")]
    expected = [tok.decode(reference_decode(m, tok.encode(p, bos=True, eos=False), 6, tok.eos_id)).strip()
                for p in prompts]
    assert out == expected and all(expected)


def test_bad_arguments():
    m = model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, PROMPTS, max_new_tokens=60)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, PROMPTS, top_p=0.0)
    with pytest.raises(ValueError, match="prompts"):
        generate(m, [])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        generate(m, [[1, 2], []])


@pytest.mark.filterwarnings("ignore::llama_adapter_fast.generation.ContextLimitWarning")  # answers fill the context
def test_a_short_prompt_beside_a_long_one_keeps_its_own_room():
    """The cap on new tokens is per sequence: the room a prompt leaves in the context, not
    the room the longest prompt of its batch leaves."""
    tok = Tokenizer()
    m = model(dtype=torch.float32, vocab_size=tok.n_words, max_seq_len=40)
    short, long = "the capital of peru is", " ".join(["red green blue"] * 8)
    n_short, n_long = (len(tok.encode(t, bos=True, eos=False)) for t in (short, long))
    room = 40 - n_short
    assert 40 - n_long < room  # the long prompt leaves less room than the short one may use
    kw = dict(max_new_tokens=room, template=False)
    together = answer(m, tok, [short, long], batch_size=2, **kw)
    alone = [answer(m, tok, [text], batch_size=1, **kw)[0] for text in (short, long)]
    assert together == alone
    # generate() takes one cap per prompt too.
    caps = [5, 2, 7]
    assert [len(r) for r in generate(m, PROMPTS, max_new_tokens=caps)] == caps
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        generate(m, PROMPTS, max_new_tokens=[1, 1, 40 - len(PROMPTS[2]) + 1])


def test_generation_through_the_decode_kernels_is_unchanged(monkeypatch):
    """Greedy generation with the fused op: every call of the two adapted layers (the
    prompts and each step, all under 17 queries) runs the decode kernels, and gives the
    tokens of the training forward and of the two-SDPA path."""
    fused = model(dtype=torch.float32, attention_backend="triton").to(DEVICE)
    with expect_launches("forward", "decode", "decode_combine", times={"forward": 0, "decode": 12,
                                                                       "decode_combine": 12}):
        decoded = generate(fused, PROMPTS, max_new_tokens=6)
    monkeypatch.setattr(attention, "MAX_DECODE_QUERIES", 0)
    with expect_launches("forward", "decode", times={"forward": 12, "decode": 0}):
        trained_path = generate(fused, PROMPTS, max_new_tokens=6)
    assert decoded == trained_path == generate(model(dtype=torch.float32), PROMPTS, max_new_tokens=6)


def test_an_answer_cut_at_the_end_of_the_context_is_announced():
    """An answer that runs into the end of the context (before max_new_tokens, with no end of
    turn) comes with a ContextLimitWarning; one that ends at max_new_tokens does not."""

    class NeverStops(Tokenizer):
        stop_ids = ()  # so that only the caps end an answer

    tok = NeverStops()
    m = model(dtype=torch.float32, vocab_size=tok.n_words, max_seq_len=40)
    short, long = "the capital of peru is", " ".join(["red green blue"] * 8)
    n_long = len(tok.encode(long, bos=True, eos=False))
    with pytest.warns(ContextLimitWarning, match=rf"instructions\[1\]: .* context of 40 tokens \(its prompt has "
                                                 rf"{n_long}\)") as caught:
        answers = answer(m, tok, [short, long], max_new_tokens=40 - n_long + 1, template=False)
    assert len(caught) == 1 and all(answers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextLimitWarning)
        answer(m, tok, [short, long], max_new_tokens=40 - n_long, template=False)
