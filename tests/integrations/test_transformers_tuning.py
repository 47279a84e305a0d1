"""LLaMA-Adapter V2's bias, scale and norm tuning through add_llama_adapter on transformers
models: the base at step 0, what trains, the eager equation, saving and removing."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llama_adapter_fast.integrations.transformers import (
    add_llama_adapter,
    llama_adapter_state_dict,
    load_llama_adapter,
    remove_llama_adapter,
    save_llama_adapter,
)
from llama_adapter_fast.integrations.transformers.tuning import TunedLinear
from llama_adapter_fast.models.tuning import SCALE_PLACEMENTS, tuned_linear_reference
from llama_adapter_fast.ops.testing import rel_error

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def base(cls=LlamaForCausalLM, config_cls=LlamaConfig):
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          attn_implementation="sdpa")).eval()


def tokens():
    return torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(1))


def tuned(model, **kw):
    kw = {"adapter_len": 3, "adapter_layers": 2, "backend": "sdpa", "bias_tuning": "all", "norm_tuning": True, **kw}
    return add_llama_adapter(copy.deepcopy(model), **kw)


@pytest.mark.parametrize("placement", SCALE_PLACEMENTS)
def test_zero_init_is_the_base_model(placement):
    plain = base()
    model = tuned(plain, scale_tuning=placement)
    assert sum(type(m) is TunedLinear for m in model.modules()) == 3 * 7 + 1  # every layer's seven, and lm_head
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, plain(tokens()).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("bias_tuning", "placement"), [("all", "output"), (("q_proj", "down_proj"), "input"),
                                                        (("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                                         "none")])
def test_gradients_reach_exactly_the_tuned_parameters(bias_tuning, placement):
    model = tuned(base(), bias_tuning=bias_tuning, scale_tuning=placement)
    names = LLAMA_LINEARS if bias_tuning == "all" else bias_tuning
    expected = {n for n, _ in model.named_parameters() if n.endswith(("adaption_prompt", "adaption_gate"))
                or n.endswith("norm.weight")
                or (n.rsplit(".", 2)[-2] in names and n.endswith(("tuned_bias", "tuned_scale")))}
    assert not any(n.endswith("tuned_scale") for n in expected) or placement != "none"
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in expected:
                p.add_(torch.randn(p.shape) * 0.1)
    model(tokens()).logits.logsumexp(-1).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(llama_adapter_state_dict(model)) == expected


@pytest.mark.parametrize("placement", ["output", "input"])
def test_the_equation_with_trained_values(placement, monkeypatch):
    """Random biases and scales (and Qwen2's own q, k, v biases): logits and every trainable
    gradient against the same model computing the eager equation, in float64."""
    model = tuned(base(Qwen2ForCausalLM, Qwen2Config), scale_tuning=placement).double()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.3)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens()).logits
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused = run()
    monkeypatch.setattr(TunedLinear, "forward", lambda self, x: tuned_linear_reference(
        x, self.weight, self.tuned_bias + (0 if self.bias is None else self.bias), self.tuned_scale,
        self.tuned_placement))
    ref = run()
    assert rel_error(fused[0], ref[0]) < 1e-12
    for name in ref[1]:
        assert rel_error(fused[1][name], ref[1][name]) < 1e-10, name


def test_save_load_and_remove(tmp_path):
    plain = base()
    model = tuned(plain, bias_tuning=("q_proj", "o_proj"), scale_tuning="input")
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape) * 0.2)
        expected = model(tokens()).logits
    save_llama_adapter(model, tmp_path / "adapter.safetensors")
    fresh = load_llama_adapter(copy.deepcopy(plain), tmp_path / "adapter.safetensors", backend="sdpa")
    assert fresh.llama_adapter_config["bias_tuning"] == ["q_proj", "o_proj"]
    with torch.no_grad():
        assert torch.equal(fresh(tokens()).logits, expected)
    remove_llama_adapter(fresh)
    assert not any(type(m) is TunedLinear or hasattr(m, "tuned_bias") for m in fresh.modules())


def test_bad_tuning_settings_change_nothing():
    plain = base()
    for kwargs, error, message in (
        (dict(bias_tuning=("q_proj", "wq")), ValueError, "no linear layers named \\['wq'\\]"),
        (dict(bias_tuning="q_proj"), ValueError, "bias_tuning must be 'all' or a sequence"),
        (dict(bias_tuning="all", scale_tuning="middle"), ValueError, "scale_tuning must be one of"),
        (dict(norm_tuning="yes"), TypeError, "norm_tuning must be a bool"),
    ):
        model = copy.deepcopy(plain)
        with pytest.raises(error, match=message):
            add_llama_adapter(model, adapter_len=3, adapter_layers=2, **kwargs)
        assert not hasattr(model, "llama_adapter_config")
        assert not any(type(m) is TunedLinear for m in model.modules())
