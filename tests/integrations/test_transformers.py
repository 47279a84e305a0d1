"""add_llama_adapter on tiny random transformers models: zero gates give the base model,
non-zero gates match PEFT's adaption prompt (identity, one gate), generate() with the
cache, saving and loading the adapter alone, and the reading of transformers' masks."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llama_adapter_fast import gated_prefix_attention
from llama_adapter_fast.integrations.masked_attention import masked_gated_prefix_attention, resolve_attention_mask
from llama_adapter_fast.integrations.transformers import (
    ATTENTION_NAME,
    add_llama_adapter,
    llama_adapter_state_dict,
    load_llama_adapter,
    remove_llama_adapter,
    save_llama_adapter,
)
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

VOCAB = 61
B, T = 3, 9
LONG_T = 37  # three of the interpreter's 16-row blocks
ARCHS = {
    "llama_mha": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=4)),
    "llama_gqa": (LlamaForCausalLM, LlamaConfig, dict(num_key_value_heads=2)),
    "mistral": (MistralForCausalLM, MistralConfig, dict(num_key_value_heads=1)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, dict(num_key_value_heads=2)),  # q, k, v biases
}


def base_model(name: str = "llama_gqa", seed: int = 0, layers: int = 3, **overrides) -> torch.nn.Module:
    model_cls, config_cls, arch = ARCHS[name]
    torch.manual_seed(seed)
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, attn_implementation="sdpa", **arch)
    config.update(overrides)
    return model_cls(config_cls(**config)).eval()


def adapted(base: torch.nn.Module, gates: bool = True, **kwargs) -> torch.nn.Module:
    kwargs = {"adapter_len": 4, "adapter_layers": 2, "backend": "sdpa", **kwargs}
    model = add_llama_adapter(copy.deepcopy(base), **kwargs)
    if gates:
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("adaption_gate"):
                    param.copy_(torch.rand(param.shape, generator=g) - 0.5)
    return model


def batch(left_padding: bool = True, T: int = T) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_padding:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def valid_logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits[inputs["attention_mask"].bool()]


@pytest.mark.parametrize("name", list(ARCHS))
def test_zero_gates_give_the_base_model(name, op_calls):
    base = base_model(name)
    model = adapted(base, gates=False)
    assert model.config._attn_implementation == ATTENTION_NAME
    for inputs in (batch(), batch(left_padding=False)):
        torch.testing.assert_close(valid_logits(model, inputs), valid_logits(base, inputs), rtol=1e-5, atol=1e-5)
    assert op_calls == ["sdpa"] * 4  # the fused op in both adapted layers, with and without padding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zero_gates_in_low_precision(dtype):
    """Prompts and gates stay float32 on a low-precision model; at zero gates the logits
    are the base model's up to that precision."""
    base = base_model("llama_gqa").to(dtype)
    model = adapted(base, gates=False)
    assert model.model.layers[2].self_attn.adaption_prompt.dtype == torch.float32
    inputs = batch()
    got, ref = valid_logits(model, inputs).float(), valid_logits(base, inputs).float()
    assert rel_error(got, ref) < 1e-2
    valid_logits(model, inputs).float().sum().backward()
    assert model.model.layers[2].self_attn.adaption_gate.grad.dtype == torch.float32


def test_generate_at_zero_gates_matches_the_base_model():
    base = base_model("llama_gqa")
    model = adapted(base, gates=False)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = base.generate(**batch(), **kwargs)
        got = model.generate(**batch(), **kwargs)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", ["llama_gqa", "mistral"])
def test_generate_with_the_cache_matches_generate_without(name):
    """Non-zero gates: decoding over transformers' cache (the op with T = 1 over S keys and
    the padding mask) gives the tokens of recomputing everything at every step."""
    model = adapted(base_model(name), gates=True, gate_activation="identity")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**batch(), use_cache=True, **kwargs)
        uncached = model.generate(**batch(), use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_generate_through_the_decode_kernels():
    """transformers' generate with the fused op: each step of the two adapted layers runs
    the decode kernels over transformers' cache and its padding mask (the prefill of 9
    tokens too), token for token what the two-SDPA path generates."""
    reference = adapted(base_model("llama_gqa"), gates=True).to(DEVICE)
    model = copy.deepcopy(reference)
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "adaption_backend"):
            layer.self_attn.adaption_backend = "triton"
    inputs = {k: v.to(DEVICE) for k, v in batch().items()}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with expect_launches("forward", "decode", "decode_combine",
                             times={"forward": 0, "decode": 12, "decode_combine": 12}):
            got = model.generate(**inputs, **kwargs)
        assert torch.equal(got, reference.generate(**inputs, **kwargs))


def test_matches_peft_adaption_prompt():
    """With the identity activation and one gate per layer the adapter is PEFT's adaption
    prompt: same prompts and gates give the same logits and gradients."""
    pytest.importorskip("peft")
    from peft import AdaptionPromptConfig, get_peft_model

    base = base_model("llama_gqa")
    ours = adapted(base, gates=True, gate_activation="identity", per_head_gate=False)
    theirs = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=4, adapter_layers=2,
                                                                       task_type="CAUSAL_LM"))
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_params.keys() == theirs_params.keys()
    with torch.no_grad():
        for n, p in theirs_params.items():
            p.copy_(ours_params[n].reshape(p.shape))
    inputs = batch()
    weights = torch.randn(B, T, VOCAB, generator=torch.Generator().manual_seed(2))[inputs["attention_mask"].bool()]
    results = []
    for model, params in ((ours, ours_params), (theirs, theirs_params)):
        logits = valid_logits(model, inputs)
        grads = torch.autograd.grad((logits * weights).sum(), list(params.values()))
        results.append((logits, [g.reshape(-1) for g in grads]))
    (logits, grads), (ref_logits, ref_grads) = results
    assert rel_error(logits, ref_logits) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-5


def test_backends_agree_and_only_the_adapter_trains():
    model = adapted(base_model("llama_gqa"), gates=True)  # tanh, one gate per head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    names = ("adaption_prompt", "adaption_gate")
    assert trainable == [f"model.layers.{i}.self_attn.{n}" for i in (1, 2) for n in names]
    assert model.model.layers[2].self_attn.adaption_gate.shape == (4,)
    inputs = batch()
    sdpa_logits = valid_logits(model, inputs)
    sdpa_logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    for module in model.modules():
        if hasattr(module, "adaption_backend"):
            module.adaption_backend = "eager"
    torch.testing.assert_close(valid_logits(model, inputs), sdpa_logits, rtol=1e-5, atol=1e-5)


def test_triton_backend_runs_the_kernels():
    # CUDA where there is a GPU, else the CPU under Triton's interpreter (see conftest.py)
    base = base_model("llama_gqa", layers=2).to(DEVICE)
    reference = adapted(base, adapter_layers=2)
    model = copy.deepcopy(reference)
    for layer in model.model.layers:
        layer.self_attn.adaption_backend = "triton"
    inputs = {k: v.to(DEVICE) for k, v in batch(T=LONG_T).items()}
    ref = valid_logits(reference, inputs)
    ref_grads = torch.autograd.grad(ref.square().sum(), [p for p in reference.parameters() if p.requires_grad])
    with expect_launches("forward", "backward_prefix", "backward", times=2):  # each adapted layer once
        got = valid_logits(model, inputs)
        grads = torch.autograd.grad(got.square().sum(), [p for p in model.parameters() if p.requires_grad])
    assert rel_error(got, ref) < 2e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 2e-5


def test_save_and_load_the_adapter_alone(tmp_path):
    model = adapted(base_model("qwen2"), gates=True)
    inputs = batch()
    expected = valid_logits(model, inputs)
    path = tmp_path / "adapter.safetensors"
    save_llama_adapter(model, path)
    from safetensors.torch import load_file

    saved = load_file(path)
    assert saved.keys() == llama_adapter_state_dict(model).keys()
    assert len(saved) == 4  # a prompt and a gate for each of the 2 adapted layers
    fresh = load_llama_adapter(base_model("qwen2"), path, backend="sdpa")
    assert fresh.llama_adapter_config["adapter_len"] == 4
    torch.testing.assert_close(valid_logits(fresh, inputs), expected)
    with pytest.raises(ValueError, match="differ"):
        load_llama_adapter(adapted(base_model("qwen2"), adapter_len=3), path)


def test_remove_restores_the_base_model():
    base = base_model("llama_gqa")
    model = adapted(base, gates=True)
    remove_llama_adapter(model)
    assert model.config._attn_implementation == "sdpa"
    assert not llama_adapter_state_dict(model)
    inputs = batch()
    torch.testing.assert_close(valid_logits(model, inputs), valid_logits(base, inputs))


def test_bad_input():
    base = base_model("llama_gqa")
    for kwargs, error, match in [
        (dict(adapter_layers=4), ValueError, "adapter_layers"),
        (dict(adapter_layers=0), ValueError, "adapter_layers"),
        (dict(adapter_len=0), ValueError, "adapter_len"),
        (dict(adapter_len=2.5), TypeError, "adapter_len"),
        (dict(gate_activation="sigmoid"), ValueError, "gate_activation"),
        (dict(per_head_gate=1), TypeError, "per_head_gate"),
        (dict(backend="cuda"), ValueError, "backend"),
    ]:
        with pytest.raises(error, match=match):
            add_llama_adapter(copy.deepcopy(base), **{"adapter_layers": 2, **kwargs})
    with pytest.raises(TypeError, match="model"):
        add_llama_adapter(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="already"):
        add_llama_adapter(adapted(base), adapter_layers=1)
    with pytest.raises(ValueError, match="no adapter"):
        save_llama_adapter(base, "unused.safetensors")
    model = adapted(base, gates=True)
    model.train()
    model.config.attention_dropout = 0.1
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        model(**batch())


# ------------------------------------------------------------------------------------------
# Reading transformers' masks


def causal_padding_mask(key_padding: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, 1, q_len, S): query t (the last q_len of S positions) sees the unpadded keys up to
    its own position. Written here, not taken from the package, which it checks."""
    S = key_padding.shape[1]
    keys, queries = torch.arange(S), torch.arange(S - q_len, S)
    return (keys[None, :] <= queries[:, None])[None, None] & key_padding[:, None, None, :]


def test_mask_reading():
    key_padding = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    # 4-d boolean (sdpa) and additive float (eager) masks of causal attention with padding
    allowed = causal_padding_mask(key_padding, 5)
    for mask in (allowed, torch.where(allowed, 0.0, torch.finfo(torch.float32).min)):
        got, general = resolve_attention_mask(mask, 2, 5, 5)
        assert general is None and torch.equal(got, key_padding)
    # rows of padding queries may be anything (older transformers unmask them for sdpa)
    unmasked = allowed.clone()
    unmasked[0, 0, :2] = True
    assert torch.equal(resolve_attention_mask(unmasked, 2, 5, 5)[0], key_padding)
    # a chunk of 2 queries over 5 cached keys, bottom-right aligned
    got, general = resolve_attention_mask(causal_padding_mask(key_padding, 2), 2, 2, 5)
    assert general is None and torch.equal(got, key_padding)
    # 2-d padding masks (flash attention style), longer than the keys: the last S columns
    got, general = resolve_attention_mask(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), 2, 1, 3)
    assert general is None and torch.equal(got, torch.ones(2, 3, dtype=torch.bool))
    assert resolve_attention_mask(None, 2, 5, 5) == (None, None)
    # a 4-d mask with nothing padded: the op gets no mask at all
    full = causal_padding_mask(torch.ones(2, 5, dtype=torch.bool), 5)
    assert resolve_attention_mask(full, 2, 5, 5) == (None, None)


def test_masks_that_are_not_causal_plus_padding_are_kept():
    allowed = causal_padding_mask(torch.ones(1, 6, dtype=torch.bool), 6)
    window = allowed & ~causal_padding_mask(torch.ones(1, 6, dtype=torch.bool), 6).tril(-3)
    packed = allowed.clone()
    packed[..., 3:, :3] = False
    bias = torch.where(allowed, 0.5, float("-inf"))
    for mask in (window, packed, bias):
        key_padding, general = resolve_attention_mask(mask, 1, 6, 6)
        assert key_padding is None and general.dtype == torch.bool and general.shape == (1, 1, 6, 6)


def test_a_masked_fallback_is_exact():
    """A packed-sequence mask reaches the two-SDPA fallback, which matches the oracle per sequence."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    pk, pv = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    gate = torch.tensor([0.3, -0.2, 0.5, 0.1])
    packed = causal_padding_mask(torch.ones(1, 6, dtype=torch.bool), 6).clone()
    packed[..., 3:, :3] = False
    out = masked_gated_prefix_attention(q, k, v, pk, pv, gate, attention_mask=packed)
    for sl in (slice(0, 3), slice(3, 6)):
        ref = gated_prefix_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], pk, pv, gate,
                                     backend="eager")
        torch.testing.assert_close(out[:, :, sl], ref)


def test_bad_masks():
    with pytest.raises(TypeError, match="attention_mask"):
        resolve_attention_mask(object(), 1, 2, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        resolve_attention_mask(torch.ones(1, 2, 2, dtype=torch.bool), 1, 2, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        resolve_attention_mask(torch.ones(1, 1, 3, 2, dtype=torch.bool), 1, 2, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        resolve_attention_mask(torch.ones(2, 1), 2, 1, 2)
    with pytest.raises(TypeError, match="attention_mask"):
        resolve_attention_mask(torch.ones(1, 1, 2, 2, dtype=torch.long), 1, 2, 2)


def test_softcapping_models_are_refused_before_anything_changes():
    """Gemma2 caps its attention logits, which the op does not: refused at add_llama_adapter,
    the model left as it was (it used to fail at the first forward)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=8, attn_implementation="eager"))
    assert model.config.attn_logit_softcapping is not None
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        add_llama_adapter(model, adapter_layers=1)
    assert model.config._attn_implementation == "eager"
    assert not any(n.endswith("adaption_prompt") for n, _ in model.named_parameters())
    model.config.attn_logit_softcapping = None  # without the cap, Gemma2's attention is the op's
    for module in model.modules():
        if hasattr(module, "attn_logit_softcapping"):
            module.attn_logit_softcapping = None
    add_llama_adapter(model, adapter_layers=1, backend="sdpa")(input_ids=torch.tensor([[1, 2, 3]]))


def test_attention_maps_are_refused_not_returned_empty():
    """The op computes no attention probabilities: output_attentions=True is a clear error
    (the base model would return them; an empty tuple would be silently wrong)."""
    model = adapted(base_model("llama_gqa"))
    with pytest.raises(ValueError, match="output_attentions"):
        model(**batch(), output_attentions=True)
    assert model(**batch()).logits.shape == (B, T, VOCAB)
