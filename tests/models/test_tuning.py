"""LLaMA-Adapter V2's bias, scale and norm tuning: the fused linear layer against the paper's
equation, the model at step 0, what trains, the adapter file, fine-tuning and its resume."""

from __future__ import annotations

import pytest
import torch

from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.models.tuning import (
    SCALE_PLACEMENTS,
    TUNABLE_LINEARS,
    TunedLinear,
    tuned_linear,
    tuned_linear_reference,
)
from llama_adapter_fast.ops.testing import rel_error

TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=32,
            adapter_layers=1, adapter_len=3, attention_backend="sdpa")
ORIGINAL_7B = dict(bias_tuning=("wq", "wo", "w1", "w2", "w3"), scale_tuning="none", norm_tuning=True)


def linear_inputs(placement, dtype, zero_scale=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    weight = torch.randn(16, 24, generator=g, dtype=torch.float64) / 5
    bias = torch.randn(16, generator=g, dtype=torch.float64)
    scale = torch.randn(16 if placement == "output" else 24, generator=g, dtype=torch.float64)
    if zero_scale:
        scale[3] = 0.0  # its gradient cannot come from y / s
    return x.to(dtype), weight.to(dtype), bias, scale


@pytest.mark.parametrize("placement", SCALE_PLACEMENTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_tuned_linear_matches_the_equation(placement, dtype):
    """Output and the gradients of x, bias and scale against the eager equation in float64;
    low precisions within a few of their own rounding units."""
    x, weight, bias, scale = linear_inputs(placement, dtype)
    x.requires_grad_(True)
    params = [bias.float().requires_grad_(), scale.float().requires_grad_()]
    if dtype == torch.float64:
        params = [bias.clone().requires_grad_(), scale.clone().requires_grad_()]
    y = tuned_linear(x, weight, params[0], params[1] if placement != "none" else None, placement)
    assert y.dtype == dtype
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(y, [x, *params[: 1 + (placement != "none")]], dy.to(dtype))

    ref_inputs = [t.detach().double().requires_grad_() for t in (x, params[0], params[1])]
    ref = tuned_linear_reference(ref_inputs[0], weight.double(), ref_inputs[1], ref_inputs[2], placement)
    ref_grads = torch.autograd.grad(ref, ref_inputs[: 2 + (placement != "none")], dy)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert rel_error(y, ref) < tol
    for name, g, r in zip(("x", "bias", "scale"), grads, ref_grads, strict=False):
        assert g.dtype == (dtype if name == "x" else params[0].dtype), name
        assert rel_error(g, r) < tol, name


def test_tuned_linear_module_starts_as_the_plain_layer():
    for placement in SCALE_PLACEMENTS:
        layer = TunedLinear(24, 16, placement)
        x = torch.randn(3, 24)
        assert torch.equal(layer(x), x @ layer.weight.T)
        assert layer.tuned_bias.dtype == torch.float32 and torch.equal(layer.tuned_bias, torch.zeros(16))
        if placement == "none":
            assert layer.tuned_scale is None
        else:
            assert torch.equal(layer.tuned_scale, torch.ones(16 if placement == "output" else 24))
    with pytest.raises(ValueError, match="placement must be one of"):
        TunedLinear(4, 4, "middle")


def tuned_model(**tuning) -> tuple[LLaMAAdapter, LLaMAAdapter]:
    """A random base and the same base with V2's tuning (at its initial values)."""
    torch.manual_seed(0)
    base = LLaMAAdapter(ModelArgs(**TINY))
    model = LLaMAAdapter(ModelArgs(**TINY, **tuning))
    model.load_state_dict(base.state_dict(), strict=False)
    return base, model


@pytest.mark.parametrize("placement", SCALE_PLACEMENTS)
def test_zero_init_is_exactly_the_base_model(placement):
    base, model = tuned_model(bias_tuning=TUNABLE_LINEARS, scale_tuning=placement, norm_tuning=True)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(tokens), base(tokens))


@pytest.mark.parametrize("tuning", [dict(bias_tuning=TUNABLE_LINEARS, scale_tuning="output", norm_tuning=True),
                                    dict(bias_tuning=("wq", "wk", "wv", "w2"), scale_tuning="input"),
                                    ORIGINAL_7B])
def test_gradients_reach_exactly_the_tuned_parameters(tuning):
    _, model = tuned_model(**tuning)
    expected = {n for n, _ in model.named_parameters() if n.endswith((".adapter_prompt", ".gate"))}
    for module_name, module in model.named_modules():
        if isinstance(module, TunedLinear):
            assert module_name.rsplit(".", 1)[-1] in tuning["bias_tuning"]
            expected |= {f"{module_name}.tuned_bias"} | ({f"{module_name}.tuned_scale"}
                                                          if tuning["scale_tuning"] != "none" else set())
    if tuning.get("norm_tuning"):
        expected |= {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    layers_tuned = sum(isinstance(m, TunedLinear) for m in model.modules())
    per_layer = [n for n in tuning["bias_tuning"] if n != "output"]  # every layer, not only the adapted ones
    assert layers_tuned == TINY["n_layers"] * len(per_layer) + ("output" in tuning["bias_tuning"])
    with torch.no_grad():  # away from the initial values, so that every gradient is non-zero
        for _, p in model.adapter_parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    model(torch.randint(0, 64, (2, 9))).logsumexp(-1).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == expected == {n for n, _ in model.adapter_parameters()}
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected)
    assert model.num_adapter_parameters() == sum(model.get_parameter(n).numel() for n in expected)


@pytest.mark.parametrize("placement", SCALE_PLACEMENTS)
def test_the_model_matches_the_equation_with_trained_values(placement, monkeypatch):
    """Random biases and scales: logits and every trainable gradient against the same model
    whose tuned layers compute the eager equation, in float64."""
    _, model = tuned_model(bias_tuning=TUNABLE_LINEARS, scale_tuning=placement, norm_tuning=True)
    model = model.double()
    with torch.no_grad():
        for _, p in model.adapter_parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype) * 0.3)
    tokens = torch.randint(0, 64, (2, 9))

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        logits.logsumexp(-1).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.adapter_parameters()}

    fused = logits_and_grads()
    monkeypatch.setattr(TunedLinear, "forward", lambda self, x: tuned_linear_reference(
        x, self.weight, self.tuned_bias, self.tuned_scale, self.placement))
    ref = logits_and_grads()
    assert rel_error(fused[0], ref[0]) < 1e-12
    for name in ref[1]:
        assert rel_error(fused[1][name], ref[1][name]) < 1e-10, name


def test_the_adapter_file_records_the_tuning_and_loads_back(tmp_path):
    _, model = tuned_model(**ORIGINAL_7B)
    with torch.no_grad():
        for _, p in model.adapter_parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    settings = read_adapter_config(path)
    assert settings["bias_tuning"] == ["wq", "wo", "w1", "w2", "w3"]
    assert settings["scale_tuning"] == "none" and settings["norm_tuning"] is True
    fresh = LLaMAAdapter(ModelArgs(**{**TINY, **settings}))
    fresh.load_state_dict({n: t for n, t in model.state_dict().items() if not model.is_trainable_name(n)},
                          strict=False)
    fresh.load_adapter(path)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))
    plain = LLaMAAdapter(ModelArgs(**TINY))
    with pytest.raises(ValueError, match="bias_tuning=\\[\\].*unexpected"):
        plain.load_adapter(path)
    with pytest.raises(ValueError, match="disagrees"):
        read_adapter_config(path, norm_tuning=False)


def test_bad_tuning_options_name_the_field():
    with pytest.raises(ValueError, match="bias_tuning: unknown linear layers \\['wx'\\]"):
        ModelArgs(**TINY, bias_tuning=("wq", "wx"))
    with pytest.raises(TypeError, match="bias_tuning must be a sequence of layer names"):
        ModelArgs(**TINY, bias_tuning="wq")
    with pytest.raises(ValueError, match="scale_tuning must be one of"):
        ModelArgs(**TINY, scale_tuning="both")
    with pytest.raises(TypeError, match="norm_tuning must be a bool"):
        ModelArgs(**TINY, norm_tuning="yes")
    with pytest.raises(ValueError, match="prefix_projection must be one of"):
        ModelArgs(**TINY, prefix_projection="base")


def test_finetune_with_v2_tuning_prints_counts_and_resumes_exactly(base_dir, data_file, tmp_path, capsys):
    from safetensors.torch import load_file

    from llama_adapter_fast import cli
    from llama_adapter_fast.training.bases import load_base
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import finetune

    def config(out, **kw):
        return TrainConfig(base=str(base_dir), data=str(data_file), out_dir=str(out), adapter_len=3, adapter_layers=1,
                           attention_backend="sdpa", max_seq_len=80, batch_size=2, max_steps=4, lr=2e-2,
                           warmup_steps=1, progress=False, plot=False, device="cpu", save_every=2,
                           bias_tuning=["wq", "wo", "w1", "w2", "w3"], scale_tuning="output", norm_tuning=True, **kw)

    finetune(config(tmp_path / "straight"))
    printed = capsys.readouterr().out
    # base: dim 32, 2 layers, FFN 96; adapter: 3 x 32 prompt + 2 gates in one layer
    v2 = 2 * 2 * (32 + 32 + 96 + 32 + 96)  # a bias and a scale per output of wq, wo, w1, w2, w3, two layers
    norms = 2 * 2 * 32 + 32
    assert f"prompts and gates 98, V2 biases and scales {v2:,}, norms {norms:,}" in printed

    def crash(event, n):
        if event == "step" and n == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(config(tmp_path / "resumed"), callback=crash)
    finetune(config(tmp_path / "resumed", resume=True))
    straight = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "adapter.safetensors"))
    assert straight.keys() == resumed.keys() and any(k.endswith(".tuned_scale") for k in straight)
    assert any(k.endswith("norm.weight") for k in straight)
    for name, t in straight.items():
        assert torch.equal(resumed[name], t), name
    assert not torch.equal(straight["layers.0.attention.wq.tuned_scale"], torch.ones(32))

    # generate reads the tuning from the adapter file and builds the model to match
    model = load_base(base_dir, **read_adapter_config(tmp_path / "straight" / "adapter.safetensors"))
    model.load_adapter(tmp_path / "straight" / "adapter.safetensors")
    assert cli.main(["generate", "--base", str(base_dir), "--adapter", str(tmp_path / "straight" /
                                                                           "adapter.safetensors"),
                     "--prompt", "Name the capital city of the country.", "--max-new-tokens", "3",
                     "--attention-backend", "sdpa", "--device", "cpu"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--base", str(base_dir), "--data", str(data_file), "--out", str(tmp_path / "x"),
                  "--bias-tuning", "wq,wz"])
    assert "unknown linear layers ['wz']" in capsys.readouterr().err


def test_resume_refuses_a_change_of_tuning(base_dir, data_file, tmp_path):
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import finetune

    def config(**kw):
        return TrainConfig(base=str(base_dir), data=str(data_file), out_dir=str(tmp_path), adapter_len=3,
                           adapter_layers=1, attention_backend="sdpa", max_seq_len=80, batch_size=2, lr=2e-2,
                           progress=False, plot=False, device="cpu", save_every=1, **kw)

    finetune(config(max_steps=1))
    with pytest.raises(ValueError, match="resume: --bias-tuning was \\[\\] .* this run has \\['wq'\\]"):
        finetune(config(max_steps=2, resume=True, bias_tuning=["wq"]))
    with pytest.raises(ValueError, match="resume: --norm-tuning was False .* this run has True"):
        finetune(config(max_steps=2, resume=True, norm_tuning=True))
