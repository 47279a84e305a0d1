"""A quantized frozen base (models.quantized): bitsandbytes' 4- and 8-bit layers really used,
the zero-gate model equal to transformers' own quantized model, the adapter's forward and
gradients equal to a full-precision model of the dequantized weights, adapter files that
load onto either base, and clear refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
torchao_quantization = pytest.importorskip("torchao.quantization")
transformers = pytest.importorskip("transformers")

from llama_adapter_fast.models import LLaMAAdapter  # noqa: E402
from llama_adapter_fast.models import quantized as quantized_module  # noqa: E402
from llama_adapter_fast.models.quantized import (  # noqa: E402
    QUANTIZATIONS,
    check_quantization,
    num_parameters,
    quantize_linears,
    weight_bytes,
)
from llama_adapter_fast.ops.testing import rel_error  # noqa: E402

from support.real_model import quantized_transformers_model  # noqa: E402

BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
V2 = dict(bias_tuning=("wq", "wv", "w1"), scale_tuning="output")


def tiny_folder(tmp_path, seed: int = 0):
    """A random Llama of transformers (GQA, weights large enough that every part matters),
    saved as a Hugging Face folder."""
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * p.shape[-1] ** -0.5)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def is_quantized_layer(module, method: str) -> bool:
    if method == "torchao-int8":
        return isinstance(getattr(module, "weight", None), torchao_quantization.Int8Tensor)
    return isinstance(module, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit)


def dequantized(module) -> torch.Tensor | None:
    """A quantized layer's weight as the float weight it computes with (4-bit and torchao)."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if is_quantized_layer(module, "torchao-int8"):
        return module.weight.dequantize()
    return None


def tokens(B: int = 2, T: int = 11) -> torch.Tensor:
    return torch.randint(0, 101, (B, T), generator=torch.Generator().manual_seed(1))


def randomize_adapter(model: LLaMAAdapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.adapter_parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", QUANTIZATIONS)
def test_the_block_linears_are_bitsandbytes_layers_and_a_fraction_of_the_memory(tmp_path, method):
    folder = tiny_folder(tmp_path)
    full = LLaMAAdapter.from_hf(folder, adapter_len=4, adapter_layers=2, **V2)
    model = LLaMAAdapter.from_hf(folder, adapter_len=4, adapter_layers=2, quantize=method, **V2)
    for block in model.layers:
        for name in BLOCK_LINEARS:
            owner = block.attention if name.startswith("w") and name[1] in "qkvo" else block.feed_forward
            assert is_quantized_layer(getattr(owner, name), method), name
    assert not is_quantized_layer(model.output, method) and model.tok_embeddings.weight.dtype == torch.float32
    # What stays float: the embedding and the head (tied or not), norms and all that trains.
    assert all(p.dtype == torch.float32 for _, p in model.adapter_parameters())
    blocks, full_blocks = weight_bytes(model.layers), weight_bytes(full.layers)
    ratio = blocks / full_blocks
    # float32 weights: nf4/fp4 store 0.5 byte per weight plus statistics, int8 1 byte plus row scales.
    assert ratio < (0.3 if "int8" in method else 0.16), ratio
    assert num_parameters(model) == num_parameters(full) == sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("method", QUANTIZATIONS)
def test_zero_gates_equal_the_quantized_base_of_transformers(tmp_path, method):
    """The same quantization of the same weights by the library's own code: at zero gates
    (and V2's zero-initialized biases and unit scales) the logits are transformers' model's."""
    folder = tiny_folder(tmp_path)
    theirs = quantized_transformers_model(folder, method)
    ours = LLaMAAdapter.from_hf(folder, adapter_len=4, adapter_layers=3, quantize=method, attention_backend="eager",
                                **V2).eval()
    with torch.no_grad():
        assert torch.allclose(ours(tokens()), theirs(tokens()).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["nf4", "fp4", "torchao-int8"])
def test_the_adapter_on_a_quantized_base_equals_a_full_model_of_its_dequantized_weights(tmp_path, method):
    """Non-zero gates, random prompts, V2's biases and scales (output and input placements):
    logits and every trainable gradient as a float model whose weights are the dequantized
    ones; no gradient reaches the base."""
    folder = tiny_folder(tmp_path)
    for placement in ("output", "input"):
        settings = dict(adapter_len=4, adapter_layers=2, attention_backend="sdpa", bias_tuning=V2["bias_tuning"],
                        scale_tuning=placement)
        model = LLaMAAdapter.from_hf(folder, quantize=method, **settings)
        randomize_adapter(model)
        reference = LLaMAAdapter.from_hf(folder, **settings)
        reference.load_adapter(model.adapter_state_dict())
        with torch.no_grad():
            for module, ref in zip(model.modules(), reference.modules(), strict=True):
                weight = dequantized(module)
                if weight is not None:
                    ref.weight.copy_(weight)
        results = []
        for m in (model, reference):
            logits = m(tokens())
            weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
            (logits * weights).sum().backward()
            results.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
        (logits, grads), (ref_logits, ref_grads) = results
        assert rel_error(logits, ref_logits) < 1e-5
        assert grads.keys() == ref_grads.keys() == {n for n, _ in model.adapter_parameters()}
        assert any(n.endswith("tuned_scale") for n in grads)
        for name in grads:
            assert rel_error(grads[name], ref_grads[name]) < 1e-4, name
        assert all(not p.requires_grad for n, p in model.named_parameters() if "tuned" not in n
                   and not n.endswith(("adapter_prompt", "gate")))


def test_adapter_files_load_onto_a_quantized_or_a_full_base(tmp_path):
    folder = tiny_folder(tmp_path)
    settings = dict(adapter_len=4, adapter_layers=2, **V2)
    model = LLaMAAdapter.from_hf(folder, quantize="nf4", **settings)
    randomize_adapter(model)
    model.save_adapter(tmp_path / "adapter.safetensors")
    for quantize in (None, "int8", "torchao-int8"):
        other = LLaMAAdapter.from_hf(folder, quantize=quantize, **settings)
        other.load_adapter(tmp_path / "adapter.safetensors")
        state, saved = other.adapter_state_dict(), model.adapter_state_dict()
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in state)


def test_the_kv_cache_decodes_as_the_whole_forward_on_a_quantized_base(tmp_path):
    from llama_adapter_fast.generation import generate

    model = LLaMAAdapter.from_hf(tiny_folder(tmp_path), adapter_len=4, adapter_layers=3, quantize="nf4").eval()
    randomize_adapter(model)
    prompt = tokens(1, 7)
    out = generate(model, prompt.tolist(), max_new_tokens=5)[0]
    ids = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(5):  # greedy, recomputing the whole sequence each step
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[7:]


def test_refusals_name_the_argument_and_change_nothing(tmp_path, monkeypatch):
    folder = tiny_folder(tmp_path)
    with pytest.raises(ValueError, match="quantize must be one of"):
        LLaMAAdapter.from_hf(folder, quantize="nf5")
    model = LLaMAAdapter.from_hf(folder, adapter_len=4, adapter_layers=2, quantize="nf4")
    with pytest.raises(ValueError, match="quantized base has no full-precision weights"):
        model.save_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()

    def unavailable(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(quantized_module, "quantized_linear", unavailable)
    with pytest.raises(ValueError, match="quantize='nf4' cannot run on cpu: .*no 4-bit kernel"):
        check_quantization("nf4", "cpu")
    monkeypatch.undo()

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    full = LLaMAAdapter.from_hf(folder, adapter_len=4, adapter_layers=2)
    before = {n: p.clone() for n, p in full.named_parameters()}
    with pytest.raises(ValueError, match=r"quantize='int8' needs bitsandbytes: .*\[quant\]"):
        quantize_linears(full, "int8")
    assert all(torch.equal(p, before[n]) for n, p in full.named_parameters())


def test_the_command_line_refuses_what_cannot_run_before_writing(tmp_path, monkeypatch, capsys):
    from llama_adapter_fast import cli

    folder = tiny_folder(tmp_path)
    data = tmp_path / "data.json"
    data.write_text('[{"instruction": "Say hi.", "input": "", "output": "hi"}]')
    run = ["finetune", "--base", str(folder), "--data", str(data), "--tokenizer", "bundled", "--max-steps", "1"]
    with pytest.raises(SystemExit):
        cli.main([*run, "--quantize", "int4", "--out", str(tmp_path / "a")])
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    assert cli.main([*run, "--quantize", "nf4", "--out", str(tmp_path / "b")]) != 0
    assert "--quantize nf4 needs bitsandbytes" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less(tmp_path, quantize):
    """Recomputing each block in the backward changes no number: padded with a key padding
    mask and packed records alike."""
    model = LLaMAAdapter.from_hf(tiny_folder(tmp_path), adapter_len=4, adapter_layers=3, quantize=quantize,
                                 attention_backend="sdpa", **V2)
    randomize_adapter(model)
    x = tokens(2, 11)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    cu = torch.tensor([0, 5, 11, 22], dtype=torch.int32)
    calls = {"padded": lambda: model(x, key_padding_mask=mask),
             "packed": lambda: model(x.reshape(1, -1), cu_seqlens=cu, max_seqlen=11)}
    for name, call in calls.items():
        results = []
        for recompute in (False, True):
            model.activation_checkpointing = recompute
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t, saved=saved: saved.append(t.numel()) or t,
                                                          lambda t: t):
                logits = call()
            (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.adapter_parameters()}
            model.zero_grad(set_to_none=True)
            results.append((logits.detach(), grads, sum(saved)))
        (logits, grads, kept), (logits_r, grads_r, kept_r) = results
        assert torch.equal(logits, logits_r), name
        assert all(torch.allclose(grads[n], grads_r[n], rtol=1e-5, atol=1e-6) for n in grads), name
        assert kept_r < kept / 2, (name, kept_r, kept)
