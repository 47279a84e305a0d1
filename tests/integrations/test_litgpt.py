"""litgpt's adapter and adapter_v2 models through the fused op, against litgpt's own forward."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("litgpt", reason="litgpt is an optional dependency (pip install llama-adapter-fast[litgpt])")

import litgpt.adapter as lit_adapter
import litgpt.adapter_v2 as lit_adapter_v2
from litgpt.generate.base import generate

from llama_adapter_fast.integrations.litgpt import (
    FusedAdapterAttention,
    FusedAdapterV2Attention,
    disable_fused_adapter,
    enable_fused_adapter,
    prefix_keys_values,
)
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

FLAVOURS = {"adapter": lit_adapter, "adapter_v2": lit_adapter_v2}
TINY = dict(n_layer=3, n_embd=32, n_head=4, padded_vocab_size=64, block_size=64, adapter_prompt_length=5,
            adapter_start_layer=1)
# litgpt's own configurations, shrunk: GQA with Llama 3's rope adjustments; MHA with a
# partial rotary embedding, parallel residual and biases; MQA with Gemma's scaled
# embeddings and an explicit head size; Gemma 2's logit softcapping; a sliding window of 4
# that bites on 11 tokens.
ARCHS = {
    "llama": dict(name="Llama-3.2-1B", n_query_groups=2, intermediate_size=48),
    "pythia": dict(name="pythia-14m"),
    "gemma": dict(name="gemma-2b", n_query_groups=1, head_size=16, intermediate_size=48),
    "gemma2": dict(name="gemma-2-9b", n_query_groups=2, head_size=8, intermediate_size=48),
    "window": dict(name="Llama-3.2-1B", n_query_groups=2, intermediate_size=48, sliding_window_size=4),
}


def lit_model(arch: str, flavour: str = "adapter", dtype=torch.float64, **overrides):
    """A tiny litgpt model with random non-zero gates (and V2 biases and scales), adapter
    parameters trainable as litgpt's recipes mark them."""
    module = FLAVOURS[flavour]
    spec = {**ARCHS[arch], **TINY, **overrides}
    config = module.Config.from_name(spec.pop("name"), **spec)
    torch.manual_seed(0)
    model = module.GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gating_factor" in name:
                p.normal_()
            elif "adapter_bias" in name:
                p.normal_(std=0.1)
            elif "adapter_scale" in name:
                p.normal_(1.0, 0.1)
    for name, p in model.named_parameters():
        p.requires_grad = module.adapter_filter(name, p)
    return model.to(dtype)


def fresh_copy(model):
    """A copy with litgpt's adapter_kv_cache emptied (litgpt keeps the prefix of its first
    forward there, graph included, which deepcopy refuses)."""
    for m in model.modules():
        if hasattr(m, "adapter_kv_cache"):
            m.adapter_kv_cache = None
    return copy.deepcopy(model)


def logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float32)).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def tokens(B=2, T=11, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted_layers(model) -> int:
    return sum(b.attn.block_idx >= model.config.adapter_start_layer for b in model.transformer.h)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ["llama", "pythia", "gemma", "gemma2", "window"])
def test_logits_and_gradients_match_litgpt_in_float64(arch, flavour):
    model = lit_model(arch, flavour)
    fused = fresh_copy(model)
    ref_logits, ref_grads = logits_and_grads(model, tokens())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_fused_adapter(fused, backend="sdpa")
    softcapped = model.config.attention_logit_softcapping is not None
    assert any("softcapping" in str(w.message) for w in caught) == softcapped
    logits, grads = logits_and_grads(fused, tokens())
    assert rel_error(logits, ref_logits) < 1e-12
    assert grads.keys() == ref_grads.keys() and any("gating_factor" in n for n in grads)
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-10, name


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ["llama", "pythia", "gemma"])
def test_triton_kernels_run_once_per_adapted_layer(arch, flavour):
    # CUDA where there is a GPU, else the CPU under Triton's interpreter (see conftest.py)
    model = lit_model(arch, flavour, dtype=torch.float32).to(DEVICE)
    fused = enable_fused_adapter(fresh_copy(model), backend="triton")
    x = tokens().to(DEVICE)
    ref_logits, ref_grads = logits_and_grads(model, x)
    with expect_launches("forward", "backward_prefix", "backward", times=adapted_layers(model)):
        logits, grads = logits_and_grads(fused, x)
    assert rel_error(logits, ref_logits) < 2e-5
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < 2e-5, name


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_the_op_gets_one_key_head_per_group(arch, monkeypatch):
    """litgpt repeats k and v over the query heads before the seam; the op receives one
    head per query group (GQA: 2 of 4, MQA: 1), in training and in generation."""
    import llama_adapter_fast.integrations.litgpt as integration

    heads = []
    op = integration.masked_gated_prefix_attention

    def recording(q, k, v, prefix_k, *args, **kwargs):
        heads.append((q.shape[1], k.shape[1], v.shape[1], prefix_k.shape[0]))
        return op(q, k, v, prefix_k, *args, **kwargs)

    monkeypatch.setattr(integration, "masked_gated_prefix_attention", recording)
    model = enable_fused_adapter(lit_model(arch), backend="sdpa")
    model(tokens()).sum().backward()
    model.set_kv_cache(batch_size=1)
    with torch.no_grad():
        generate(model, tokens(B=1, T=6)[0], max_returned_tokens=8, top_k=1)
    groups = model.config.n_query_groups
    assert len(heads) == adapted_layers(model) * 3  # training, then the prompt (its first token) and one more
    assert set(heads) == {(model.config.n_head, groups, groups, groups)}


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("arch", ["llama", "pythia", "gemma"])
def test_greedy_generation_with_litgpts_kv_cache(arch, flavour):
    """litgpt's generate (prefill, then one token at a time through its KV cache and its
    cache masks): the decode kernels serve every call of every adapted layer, and the
    tokens are litgpt's own."""
    model = lit_model(arch, flavour, dtype=torch.float32).to(DEVICE).eval()
    fused = enable_fused_adapter(fresh_copy(model), backend="triton")
    prompt = tokens(B=1, T=6)[0].to(DEVICE)
    calls = []
    fused.register_forward_hook(lambda *_: calls.append(1))
    model.set_kv_cache(batch_size=1, device=DEVICE)
    fused.set_kv_cache(batch_size=1, device=DEVICE)
    with torch.inference_mode():
        ref = generate(model, prompt, max_returned_tokens=12, top_k=1)
        # the prompt, then 5 tokens one at a time: 6 forwards
        with expect_launches("forward", "decode", times={"forward": 0, "decode": 6 * adapted_layers(model)}):
            got = generate(fused, prompt, max_returned_tokens=12, top_k=1)
    assert len(calls) == 6 and torch.equal(got, ref)


def test_generation_sees_the_prompt_after_a_training_step():
    """Without gradients the fused path keeps the prefix keys and values while the prompt
    and the qkv weights are unchanged, and recomputes them once an optimizer step changes
    them (litgpt's own cache would keep serving the first prefix)."""
    fused = enable_fused_adapter(lit_model("llama"), backend="sdpa")
    x = tokens()
    with torch.no_grad():
        before = fused(x)
        assert torch.equal(fused(x), before)
    optimizer = torch.optim.SGD([p for p in fused.parameters() if p.requires_grad], lr=0.1)
    fused(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        after = fused(x)
        reference = disable_fused_adapter(fresh_copy(fused))(x)
    assert not torch.equal(after, before)
    assert rel_error(after, reference) < 1e-12


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_several_training_steps_in_a_row(flavour):
    """litgpt's own path fails at its second step (its adapter_kv_cache holds the first
    step's freed graph); the fused path trains on, every step matching litgpt's arithmetic
    with its cache emptied before each step."""
    model = lit_model("llama", flavour)
    fused = enable_fused_adapter(fresh_copy(model), backend="sdpa")
    reference = fresh_copy(model)
    x = tokens()

    def step(m, optimizer):
        optimizer.zero_grad()
        m(x).logsumexp(-1).mean().backward()
        prompt = m.transformer.h[-1].attn.adapter_wte.weight
        assert prompt.grad is not None and prompt.grad.abs().sum() > 0
        optimizer.step()

    litgpt_optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    step(model, litgpt_optimizer)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        step(model, litgpt_optimizer)

    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (fused, reference)]
    for _ in range(3):
        step(fused, optimizers[0])
        for m in reference.modules():
            if hasattr(m, "adapter_kv_cache"):
                m.adapter_kv_cache = None
        step(reference, optimizers[1])
    for (name, p), q in zip(fused.named_parameters(), reference.parameters(), strict=True):
        assert rel_error(p, q) < 1e-10, name


def test_prefix_projections():
    """"litgpt" slices the prompt's qkv output per query group; "own" takes the rows of the
    layer's own keys and values. The two coincide with one query group only."""
    for arch, same in (("llama", False), ("gemma", True)):
        attention = lit_model(arch).transformer.h[-1].attn
        config = attention.config
        qkv = attention.qkv(attention.adapter_wte.weight)
        q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
        own_k = qkv[:, q_size:q_size + kv_size].reshape(config.adapter_prompt_length, -1, config.head_size)
        base_k, base_v = prefix_keys_values(attention, "own")
        litgpt_k, _ = prefix_keys_values(attention, "litgpt")
        assert torch.equal(base_k, own_k.transpose(0, 1)) and base_v.shape == base_k.shape
        assert torch.equal(litgpt_k, base_k) == same


def test_base_projection_option_runs_and_differs():
    model = lit_model("llama")
    x = tokens()
    with torch.no_grad():
        litgpt_logits = enable_fused_adapter(fresh_copy(model), backend="sdpa")(x)
        base_logits = enable_fused_adapter(fresh_copy(model), backend="sdpa", prefix_projection="own")(x)
    assert rel_error(base_logits, litgpt_logits) > 1e-3


def test_enable_and_disable_keep_names_state_and_litgpts_path():
    model = lit_model("llama", "adapter_v2")
    names = list(model.state_dict())
    x = tokens()
    with torch.no_grad():
        ref = fresh_copy(model)(x)
        enable_fused_adapter(model, backend="sdpa")
        enable_fused_adapter(model, backend="eager")  # idempotent, the last options apply
        attentions = [b.attn for b in model.transformer.h]
        assert all(type(a) is FusedAdapterV2Attention and a.fused_backend == "eager" for a in attentions)
        assert list(model.state_dict()) == names
        assert rel_error(model(x), ref) < 1e-12
        disable_fused_adapter(model)
        assert all(type(a) is lit_adapter_v2.CausalSelfAttention for a in attentions)
        assert not any(hasattr(a, "fused_backend") for a in attentions)
        assert torch.equal(model(x), ref)
    v1 = enable_fused_adapter(lit_model("pythia"))
    assert all(type(b.attn) is FusedAdapterAttention and b.attn.fused_backend == "auto" for b in v1.transformer.h)


def test_refusals_name_the_argument():
    from litgpt.model import GPT, Config

    model = lit_model("llama")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        enable_fused_adapter("model")
    with pytest.raises(ValueError, match="backend must be one of"):
        enable_fused_adapter(model, backend="flash")
    with pytest.raises(ValueError, match="prefix_projection must be one of"):
        enable_fused_adapter(model, prefix_projection="paper")
    with pytest.raises(ValueError, match="model has no litgpt adapter attention"):
        enable_fused_adapter(GPT(Config(n_layer=1, n_embd=8, n_head=2, padded_vocab_size=8, block_size=8)))

    class Custom(lit_adapter.CausalSelfAttention):
        pass

    model.transformer.h[1].attn.__class__ = Custom
    with pytest.raises(TypeError, match="Custom is not litgpt's adapter"):
        enable_fused_adapter(model)
    assert not any(hasattr(b.attn, "fused_backend") for b in model.transformer.h)  # a refused call changes nothing
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        disable_fused_adapter(None)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_fused_adapter_on_litgpts_quantized_model_matches_litgpt(flavour, mode, op_calls):
    """litgpt's `--quantize bnb.nf4` / `bnb.int8` model: Lightning's bitsandbytes plugin swaps
    the linear layers for its quantized classes, which quantize when moved to a device (its
    own move is CUDA-only; bitsandbytes' CPU backend quantizes here on the same move). The
    fused adapter gives litgpt's logits and adapter gradients on it."""
    bnb = pytest.importorskip("bitsandbytes")
    from lightning.fabric.plugins.precision.bitsandbytes import BitsandbytesPrecision

    model = lit_model("llama", flavour, dtype=torch.float32, n_embd=64, intermediate_size=128)
    model = BitsandbytesPrecision(mode, torch.float32 if mode == "nf4" else torch.float16).convert_module(model)
    for m in model.modules():
        if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            m.weight = m.weight.to("cpu")
    layer_type = bnb.nn.Linear4bit if mode == "nf4" else bnb.nn.Linear8bitLt
    assert sum(isinstance(m, layer_type) for m in model.modules()) >= 3 * 4
    x = tokens()
    fused = enable_fused_adapter(fresh_copy(model), backend="sdpa")
    ref_logits, ref_grads = logits_and_grads(model, x)
    logits, grads = logits_and_grads(fused, x)
    assert op_calls == ["sdpa"] * 2  # one fused call in each adapted layer (layers 1 and 2)
    assert rel_error(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        assert rel_error(grads[name], ref_grads[name]) < 1e-4, name
