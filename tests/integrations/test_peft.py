"""PEFT's adaption prompts through the fused op, against PEFT's own forward: logits,
gradients of every adaption tensor, greedy generation with PEFT's cache, low precision,
save and load, adapter switching. Tiny random Llama, Mistral and GPT-2 models built here."""

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from peft.tuners.adaption_prompt.layer import AdaptedAttention, AdaptedAttentionGPT
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from llama_adapter_fast.integrations.peft import (
    FusedAdaptedAttention,
    FusedAdaptedAttentionGPT,
    disable_fused_adaption_prompt,
    enable_fused_adaption_prompt,
)
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

VOCAB = 61
B, T = 3, 9
LONG_T = 37  # three of the interpreter's 16-row blocks

# name: (architecture, config overrides)
MODELS = {
    "llama_mha": ("llama", dict(num_key_value_heads=4)),
    "llama_gqa": ("llama", dict(num_key_value_heads=2)),
    # o_proj with a bias (PEFT adds it twice) and eager attention (additive float masks)
    "llama_bias_eager": ("llama", dict(num_key_value_heads=2, attention_bias=True, attn_implementation="eager")),
    "mistral_mqa": ("mistral", dict(num_key_value_heads=1)),
    # a window shorter than the sequence: not causal + key padding, so the masked fallback runs
    "mistral_sliding_window": ("mistral", dict(num_key_value_heads=2, sliding_window=4)),
    "gpt2": ("gpt2", dict()),
    # GPT-2's word scores scaled by 1/(layer + 1) and upcast (eager): PEFT's prefix keeps 1/sqrt(D)
    "gpt2_eager_scaled": ("gpt2", dict(attn_implementation="eager", scale_attn_by_inverse_layer_idx=True,
                                       reorder_and_upcast_attn=True)),
    "gpt2_unscaled": ("gpt2", dict(scale_attn_weights=False)),
}
FUSED = (FusedAdaptedAttention, FusedAdaptedAttentionGPT)


def base_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64, attn_implementation="sdpa",
                      attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        config.update(overrides)
        return GPT2LMHeadModel(GPT2Config(**config))
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attn_implementation="sdpa")
    config.update(overrides)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**config))
    config.setdefault("sliding_window", None)
    return MistralForCausalLM(MistralConfig(**config))


def peft_model(arch: str = "llama", adapter_layers: int = 2, **overrides) -> torch.nn.Module:
    model = get_peft_model(base_model(arch, **overrides),
                           AdaptionPromptConfig(adapter_len=5, adapter_layers=adapter_layers, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # PEFT starts at zero gates, where the prefix would not matter
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.3)
    return model


def batch(left_padding: bool = True, T: int = T) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if left_padding:
        mask[0, :3] = 0
        mask[2, :1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def adaption_parameters(model) -> dict[str, torch.nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert params and all(n.rsplit(".", 1)[-1] in ("adaption_prompt", "adaption_gate") for n in params)
    return params


def logits_and_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits at the real (non-padding) positions and the gradients of every adaption
    tensor of a random linear function of them."""
    out = model(**inputs, use_cache=False).logits.float()
    valid = inputs["attention_mask"].bool()
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(11)).to(out.device)
    loss = (out * weights)[valid].sum()
    params = adaption_parameters(model)
    grads = torch.autograd.grad(loss, list(params.values()))
    return out[valid].detach(), {n: g.float() for n, g in zip(params, grads, strict=True)}


def assert_close(got, ref, tol: float, what: str = "") -> None:
    err = rel_error(got, ref)
    assert err < tol, f"{what}: relative error {err:.3g} over {tol}"


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_gradients_match_peft(name, op_calls):
    arch, overrides = MODELS[name]
    model = peft_model(arch, **overrides)
    inputs = batch()
    ref_logits, ref_grads = logits_and_grads(model, inputs)
    names_before = list(model.state_dict())
    enable_fused_adaption_prompt(model, backend="sdpa")
    assert list(model.state_dict()) == names_before
    assert sum(isinstance(m, FUSED) for m in model.modules()) == 2
    logits, grads = logits_and_grads(model, inputs)
    # One fused op per adapted layer; a window that bites takes the masked fallback instead.
    assert op_calls == ([] if name == "mistral_sliding_window" else ["sdpa", "sdpa"])
    if arch == "gpt2":  # GPT-2's own attention for the words, the op for the prefix alone
        assert all(not kw["causal"] and kw.get("key_padding_mask") is None for kw in op_calls.kwargs)
    assert_close(logits, ref_logits, 1e-5, "logits")
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], 5e-5, n)  # float32 sums over every token


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eager_backend_and_no_padding(arch):
    model = peft_model(arch)
    inputs = batch(left_padding=False)
    ref_logits, ref_grads = logits_and_grads(model, inputs)
    enable_fused_adaption_prompt(model, backend="eager")
    logits, grads = logits_and_grads(model, inputs)
    assert_close(logits, ref_logits, 1e-5, "logits")
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], 5e-5, n)  # float32 sums over every token


@pytest.mark.parametrize("name", ["llama_gqa", "mistral_mqa", "llama_bias_eager", "gpt2", "gpt2_eager_scaled"])
def test_greedy_generation_matches_peft(name, op_calls):
    arch, overrides = MODELS[name]
    model = peft_model(arch, **overrides).eval()
    inputs = batch()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **kwargs)
        enable_fused_adaption_prompt(model, backend="sdpa")
        got = model.generate(**inputs, **kwargs)
    assert got.shape == (B, T + 6)
    assert torch.equal(got, ref)
    assert len(op_calls) == 2 * 6  # prefill and 5 decoding steps over the cache, 2 adapted layers


def draws_of_gradients(model, inputs: dict, seeds) -> dict[str, list[torch.Tensor]]:
    """The gradients of every adaption tensor for several random linear functions of the
    logits, one per seed."""
    draws: dict[str, list[torch.Tensor]] = {}
    for seed in seeds:
        out = model(**inputs, use_cache=False).logits.float()
        valid = inputs["attention_mask"].bool()
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
        params = adaption_parameters(model)
        grads = torch.autograd.grad((out * weights)[valid].sum(), list(params.values()))
        for n, g in zip(params, grads, strict=True):
            draws.setdefault(n, []).append(g.float())
    return draws


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_low_precision(arch, dtype, floor):
    """In float16 and bfloat16 the fused path is no further from PEFT's float32 result than
    twice PEFT's own low-precision error (or a small floor).

    A gate's gradient is one sum over every token, and for some draws of the loss it nearly
    cancels: with the weights of seed 11 the top gate's gradient of this model is a fiftieth
    of its usual size, and its relative error then measures the cancellation, not the
    implementation (in float16, PEFT's own error is 6% there and ours 15%; over other draws
    both are about 0.1%, and which is larger changes with the draw and with the CPU's SDPA
    kernels: that draw alone failed on AVX2 machines and passed elsewhere). So each gradient
    is compared over 12 draws, its error taken relative to the gradient's typical size (the
    RMS of its norm over the draws) and summed as an RMS over the draws, which no single
    cancellation decides."""
    model32 = peft_model(arch)
    inputs = batch()
    ref_logits, _ = logits_and_grads(model32, inputs)
    model = copy.deepcopy(model32).to(dtype)
    peft_logits, _ = logits_and_grads(model, inputs)
    fused = copy.deepcopy(model)
    enable_fused_adaption_prompt(fused, backend="sdpa")
    logits, _ = logits_and_grads(fused, inputs)
    assert rel_error(logits, ref_logits) <= max(2 * rel_error(peft_logits, ref_logits), floor)
    seeds = range(11, 23)
    ref, peft, ours = (draws_of_gradients(m, inputs, seeds) for m in (model32, model, fused))
    for n in ref:
        size = torch.stack([g.double().norm() for g in ref[n]]).square().mean().sqrt()

        def error(draws, n=n, size=size):
            diffs = torch.stack([(g.double() - r.double()).norm() for g, r in zip(draws[n], ref[n], strict=True)])
            return (diffs.square().mean().sqrt() / size).item()

        err, peft_err = error(ours), error(peft)
        assert err <= max(2 * peft_err, floor), f"{n}: {err:.3g} vs PEFT's {peft_err:.3g}"


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_triton_backend_runs_the_kernels(arch):
    # CUDA where there is a GPU, else the CPU under Triton's interpreter (see conftest.py)
    layers = dict(n_layer=2) if arch == "gpt2" else dict(num_hidden_layers=2)
    model = peft_model(arch, adapter_layers=2, **layers).to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in batch(T=LONG_T).items()}
    ref_logits, ref_grads = logits_and_grads(model, inputs)
    enable_fused_adaption_prompt(model, backend="triton")
    # Each adapted layer launches each kernel once; GPT-2's prefix-only call has no word
    # keys, hence no key/value gradient kernel.
    kernels = ("forward", "backward_prefix") + (() if arch == "gpt2" else ("backward",))
    with expect_launches(*kernels, times=2):
        logits, grads = logits_and_grads(model, inputs)
    assert_close(logits, ref_logits, 2e-5, "logits")
    for n in ref_grads:
        assert_close(grads[n], ref_grads[n], 2e-5, n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_generation_through_the_decode_kernels(arch):
    """PEFT's generate with the fused op: each call of the two adapted layers (prefill and
    steps) runs the decode kernels, and the tokens are PEFT's own."""
    model = peft_model(arch).to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) for k, v in batch().items()}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(**inputs, **kwargs)
        enable_fused_adaption_prompt(model, backend="triton")
        with expect_launches("forward", "decode", "decode_combine",
                             times={"forward": 0, "decode": 12, "decode_combine": 12}):
            got = model.generate(**inputs, **kwargs)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_save_and_load_with_peft(arch, tmp_path):
    model = peft_model(arch)
    enable_fused_adaption_prompt(model, backend="sdpa")
    inputs = batch()
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model(arch, seed=0), tmp_path)
    state = {k: v for k, v in reloaded.state_dict().items() if "adaption_" in k}
    assert state.keys() == {k for k in model.state_dict() if "adaption_" in k}
    enable_fused_adaption_prompt(reloaded, backend="sdpa")
    torch.testing.assert_close(reloaded(**inputs).logits, expected)


PEFT_CLASSES = {"llama": AdaptedAttention, "gpt2": AdaptedAttentionGPT}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_disable_restores_peft_forward(arch):
    model = peft_model(arch)
    inputs = batch()
    ref = model(**inputs).logits
    enable_fused_adaption_prompt(model, backend="sdpa")
    enable_fused_adaption_prompt(model, backend="eager")  # idempotent, takes the new backend
    assert {m.fused_backend for m in model.modules() if isinstance(m, FUSED)} == {"eager"}
    disable_fused_adaption_prompt(model)
    adapted = [m for m in model.modules() if isinstance(m, PEFT_CLASSES[arch])]
    assert len(adapted) == 2 and all(type(m) is PEFT_CLASSES[arch] for m in adapted)
    torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=0)


def two_adapter_model(arch: str = "llama", adapter_len: int = 5, adapter_layers: int = 2,
                      gate: float = -0.9) -> torch.nn.Module:
    """PEFT's model with a second adaption prompt, "other" (the same shape as "default" by
    default), both with open gates; "default" active."""
    model = peft_model(arch)
    model.add_adapter("other", AdaptionPromptConfig(adapter_len=adapter_len, adapter_layers=adapter_layers,
                                                    task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.set_adapter("other")
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(gate)
        model.set_adapter("default")
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_switching_and_disabling(arch, op_calls):
    """Inactive adapters are fused too; switching and disabling keep PEFT's results."""
    model = two_adapter_model(arch, adapter_len=3, adapter_layers=1, gate=0.8)
    with torch.no_grad():
        model.set_adapter("other")
        inputs = batch()
        expected = {"other": model(**inputs).logits}
        model.set_adapter("default")
        expected["default"] = model(**inputs).logits
        with model.disable_adapter():
            expected[None] = model(**inputs).logits
        enable_fused_adaption_prompt(model, backend="sdpa")
        model.set_adapter("other")
        adapted = [m for m in model.modules() if isinstance(m, PEFT_CLASSES[arch])]
        assert len(adapted) == 1 and isinstance(adapted[0], FUSED)
        torch.testing.assert_close(model(**inputs).logits, expected["other"])
        assert len(op_calls) == 1
        model.set_adapter("default")
        assert sum(isinstance(m, FUSED) for m in model.modules()) == 2
        torch.testing.assert_close(model(**inputs).logits, expected["default"])
        assert len(op_calls) == 3
        with model.disable_adapter():
            torch.testing.assert_close(model(**inputs).logits, expected[None])
        assert len(op_calls) == 3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_attentions_falls_back_to_peft(arch):
    model = peft_model(arch, attn_implementation="eager")
    inputs = batch()
    ref = model(**inputs, output_attentions=True)
    enable_fused_adaption_prompt(model, backend="sdpa")
    with pytest.warns(UserWarning, match="output_attentions"):
        got = model(**inputs, output_attentions=True)
    torch.testing.assert_close(got.logits, ref.logits)
    assert len(got.attentions) == len(ref.attentions) == 3
    for a, r in zip(got.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, r)


def test_bad_input():
    with pytest.raises(ValueError, match="no adaption prompts"):
        enable_fused_adaption_prompt(base_model("llama"))
    with pytest.raises(ValueError, match="backend"):
        enable_fused_adaption_prompt(peft_model("llama"), backend="cuda")
    with pytest.raises(TypeError, match="model"):
        enable_fused_adaption_prompt("model")
    gpt2 = peft_model("gpt2")
    del gpt2.base_model.model.transformer.h[2].attn.model.scaling  # not the GPT2Attention the fused forward reads
    with pytest.raises(TypeError, match="gpt2"):
        enable_fused_adaption_prompt(gpt2)
    assert not any(isinstance(m, FUSED) for m in gpt2.modules())  # nothing changed


@pytest.mark.parametrize("arch", ["mistral", "gpt2"])
def test_inference_mode_and_eager_masks(arch, op_calls):
    """Under torch.inference_mode (tensors without version counters) with eager attention's
    additive masks, generation still matches PEFT and goes through the fused op."""
    model = peft_model(arch, attn_implementation="eager").eval()
    inputs = batch()
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref = model.generate(**inputs, **kwargs)
        enable_fused_adaption_prompt(model, backend="sdpa")
        got = model.generate(**inputs, **kwargs)
    assert torch.equal(got, ref) and len(op_calls) == 2 * 4


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_adapter_names_mix_adapters_in_one_batch(arch):
    """PEFT's adapter_names convention: each row of one batch gets its adapter's logits and
    greedy tokens (or the base's for "__base__"), as PEFT computes them for that adapter
    alone. PEFT's own adaption prompt ignores the argument."""
    model = two_adapter_model(arch)
    inputs, names = batch(), ["other", "__base__", "default"]
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        alone, tokens = {}, {}
        for name in ("other", "default", "__base__"):
            if name == "__base__":
                with model.disable_adapter():
                    alone[name], tokens[name] = model(**inputs).logits, model.generate(**inputs, **gen)
            else:
                model.set_adapter(name)
                alone[name], tokens[name] = model(**inputs).logits, model.generate(**inputs, **gen)
        model.set_adapter("default")
        torch.testing.assert_close(model(**inputs, adapter_names=names).logits, alone["default"])  # PEFT: ignored
        enable_fused_adaption_prompt(model, backend="sdpa")
        mixed = model(**inputs, adapter_names=names).logits
        generated = model.generate(**inputs, adapter_names=names, **gen)
    valid = inputs["attention_mask"].bool()
    for b, name in enumerate(names):
        assert_close(mixed[b][valid[b]], alone[name][b][valid[b]], 1e-5, name)
        assert torch.equal(generated[b], tokens[name][b]), name
    assert len({tuple(tokens[n][b].tolist()) for b, n in enumerate(names)}) == 3  # they really differ


def test_adapter_names_through_the_decode_kernels():
    model = two_adapter_model()
    enable_fused_adaption_prompt(model, backend="sdpa")
    names, gen = ["default", "other", "__base__"], dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**batch(), adapter_names=names, **gen)
        enable_fused_adaption_prompt(model.to(DEVICE), backend="triton")
        inputs = {k: v.to(DEVICE) for k, v in batch().items()}
        with expect_launches("decode", "decode_combine"):
            tokens = model.generate(**inputs, adapter_names=names, **gen)
    assert torch.equal(tokens.cpu(), expected)


def test_adapter_names_refusals():
    model = two_adapter_model()
    model.add_adapter("short", AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM"))
    enable_fused_adaption_prompt(model, backend="sdpa")
    inputs = batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"no adapter named \['nope'\]"):
            model(**inputs, adapter_names=["nope", "default", "other"])
        with pytest.raises(ValueError, match="'short' .* cannot share a batch"):
            model(**inputs, adapter_names=["short", "default", "other"])
        with pytest.raises(ValueError, match="one name per sample of the batch \\(3\\), got 2"):
            model(**inputs, adapter_names=["default", "other"])
        with pytest.raises(ValueError, match="one per sample"):
            model(**inputs, adapter_names="default")
        # Nothing stays behind: the next call without names is the active adapter's.
        torch.testing.assert_close(model(**inputs).logits, model(**inputs, adapter_names=["default"] * 3).logits)
        disable_fused_adaption_prompt(model)
        assert "_enable_peft_forward_hooks" not in vars(model.base_model)
