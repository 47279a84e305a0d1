"""Several adapters over one base in one batch (AdapterBank): each sample gets the answer
and the logits its adapter gives alone, a sample without adapter the base's; loading and
unloading at run time; refusals that change nothing."""

from __future__ import annotations

import pytest
import torch

from llama_adapter_fast.generation import answer, generate
from llama_adapter_fast.models.adapter_bank import AdapterBank
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import KVCache, LLaMAAdapter
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 3], [1, 8, 8, 4, 30, 11, 12, 6, 21, 40], [4, 4, 9]]
NAMES = ["a", None, "b", "a"]


def base(dtype=torch.float64, **kw) -> LLaMAAdapter:
    """A random model (float64 so that argmax ties cannot flip), GQA, adapters in 2 of 3 layers."""
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=48, multiple_of=16, max_seq_len=64,
                adapter_len=4, adapter_layers=2, attention_backend="sdpa")
    args.update(kw)
    return LLaMAAdapter(ModelArgs(**args)).to(dtype).eval()


def random_adapter(model: LLaMAAdapter, seed: int) -> dict[str, torch.Tensor]:
    """Random prompts and open, different gates, as a state dict."""
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(p.shape, generator=g) * (1.5 if name.endswith("gate") else 1.0)).to(p)
            for name, p in model.adapter_parameters()}


def alone(model: LLaMAAdapter, adapter: dict | None, prompt: list[int], steps: int) -> list[int]:
    """The prompt by itself, the adapter loaded into the model (None: zero gates, the base)."""
    model.load_adapter(adapter if adapter is not None else {n: torch.zeros_like(p) if n.endswith("gate") else p
                                                            for n, p in model.adapter_state_dict().items()})
    return generate(model, [prompt], max_new_tokens=steps)[0]


@pytest.mark.parametrize("scalar_gate", [False, True])
def test_a_mixed_batch_answers_each_prompt_as_its_adapter_alone(scalar_gate):
    model = base(scalar_gate=scalar_gate)
    adapters = {"a": random_adapter(model, 1), "b": random_adapter(model, 2)}
    bank = AdapterBank(model)
    for name, state in adapters.items():
        bank.load(name, state)
    mixed = generate(model, PROMPTS, max_new_tokens=8, adapters=bank, adapter_names=NAMES)
    expected = [alone(model, adapters.get(n), p, 8) for p, n in zip(PROMPTS, NAMES, strict=True)]
    assert mixed == expected
    assert len({tuple(t) for t in expected[:3]}) == 3  # the adapters and the base really differ


def test_mixed_logits_equal_each_adapter_alone_and_the_base_at_a_zero_gate():
    model = base()
    adapters = {"a": random_adapter(model, 1), "b": random_adapter(model, 2)}
    bank = AdapterBank(model)
    for name, state in adapters.items():
        bank.load(name, state)
    tokens = torch.randint(0, 48, (4, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = KVCache(model, 4, 7, prefixes=bank.prefixes(NAMES))
        mixed = model(tokens, cache=cache)
        for b, name in enumerate(NAMES):
            if name is None:  # the base: every gate shut, the same arithmetic
                model.load_adapter({n: torch.zeros_like(p) for n, p in model.adapter_state_dict().items()})
            else:
                model.load_adapter(adapters[name])
            assert rel_error(mixed[b], model(tokens[b:b + 1])[0]) < 1e-12, name


def test_the_fused_kernels_take_per_sample_prefixes_and_gates():
    """The Triton path (decode kernels for the prompt and each step) gives the two-SDPA
    path's tokens on a mixed batch."""
    fused, plain = base(torch.float32, attention_backend="triton").to(DEVICE), base(torch.float32)
    banks = [AdapterBank(m) for m in (fused, plain)]
    for seed, name in ((1, "a"), (2, "b")):
        state = random_adapter(plain, seed)
        for bank in banks:
            bank.load(name, state)
    with expect_launches("decode", "decode_combine", times={"decode": 12, "decode_combine": 12}):
        tokens = generate(fused, PROMPTS, max_new_tokens=6, adapters=banks[0], adapter_names=NAMES)
    assert tokens == generate(plain, PROMPTS, max_new_tokens=6, adapters=banks[1], adapter_names=NAMES)


def test_load_and_unload_at_run_time_leave_the_models_own_adapter(tmp_path):
    model = base()
    own = {n: p.clone() for n, p in random_adapter(model, 7).items()}
    model.load_adapter(own)
    other = base()
    other.load_adapter(random_adapter(other, 3))
    other.save_adapter(tmp_path / "c.safetensors")
    bank = AdapterBank(model)
    bank.load("c", tmp_path / "c.safetensors")  # from a file, checked as load_adapter checks it
    bank.load("own", model.adapter_state_dict())
    assert bank.names == ["c", "own"] and "c" in bank
    for name, value in model.adapter_state_dict().items():
        assert torch.equal(value, own[name]), name
    # The model's own adapter under a name answers as the model does.
    assert generate(model, PROMPTS, max_new_tokens=5, adapters=bank, adapter_names=["own"] * 4) == \
        generate(model, PROMPTS, max_new_tokens=5)
    bank.unload("c")
    assert bank.names == ["own"]
    with pytest.raises(ValueError, match=r"\['c'\] not loaded"):
        generate(model, PROMPTS, max_new_tokens=2, adapters=bank, adapter_names=["c", None, None, None])
    with pytest.raises(KeyError, match="'c' is not loaded"):
        bank.unload("c")


def test_answer_takes_one_adapter_name_per_instruction():
    from llama_adapter_fast.training.tokenizer import Tokenizer

    tok = Tokenizer()
    model = base(vocab_size=tok.n_words, max_seq_len=128)
    state = random_adapter(model, 4)
    bank = AdapterBank(model)
    bank.load("x", state)
    instructions = ["Name a colour.", "Add two and three.", "Say hello."]
    mixed = answer(model, tok, instructions, max_new_tokens=5, batch_size=2, adapters=bank,
                   adapter_names=["x", None, "x"])
    model.load_adapter(state)
    assert [mixed[0], mixed[2]] == answer(model, tok, [instructions[0], instructions[2]], max_new_tokens=5)


def test_refusals_name_the_argument_and_change_nothing():
    model = base()
    bank = AdapterBank(model)
    bank.load("a", random_adapter(model, 1))
    before = {n: p.clone() for n, p in model.adapter_state_dict().items()}
    wrong = base(adapter_len=5)
    with pytest.raises(ValueError, match="adapter_prompt has shape"):
        bank.load("b", wrong.adapter_state_dict())
    broken = random_adapter(model, 2)
    broken[next(n for n in broken if n.endswith("gate"))].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        bank.load("a", broken)
    assert bank.names == ["a"]
    assert all(torch.equal(p, before[n]) for n, p in model.adapter_state_dict().items())
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        bank.load("", random_adapter(model, 1))
    with pytest.raises(ValueError, match="one adapter name .* per prompt"):
        generate(model, PROMPTS, adapters=bank, adapter_names=["a"])
    with pytest.raises(ValueError, match="adapter_names needs adapters"):
        generate(model, PROMPTS, adapter_names=NAMES)
    with pytest.raises(ValueError, match="adapter_names needs adapters"):
        generate(base(), PROMPTS, adapters=bank, adapter_names=NAMES)  # a bank of another model
    with pytest.raises(ValueError, match="give adapter_names too"):
        generate(model, PROMPTS, adapters=bank)
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, PROMPTS, adapters=bank, adapter_names=["a"] * 4, use_cache=False)
    with pytest.raises(ValueError, match="bias, scale and norm tuning"):
        AdapterBank(base(bias_tuning=("wq",)))
    with pytest.raises(TypeError, match="model must be a LLaMAAdapter"):
        AdapterBank(None)
