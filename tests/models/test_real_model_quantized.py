"""SmolLM2-135M-Instruct on a quantized base (bitsandbytes' CPU backend, torchao): the
package's model against transformers' own quantized model of the same folder, the PEFT
backend on a base transformers loaded in 4 bits (PEFT's prepare_model_for_kbit_training
flow), and the command line's --quantize (fine-tuning that resumes exactly, generation).
add_llama_adapter on a 4-bit base is tested beside the full one in test_real_model.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from llama_adapter_fast import cli  # noqa: E402
from llama_adapter_fast.cli.demos.real import bundled_gguf, date_records  # noqa: E402
from llama_adapter_fast.models import LLaMAAdapter  # noqa: E402
from llama_adapter_fast.models.quantized import weight_bytes  # noqa: E402
from llama_adapter_fast.ops.testing import rel_error  # noqa: E402
from llama_adapter_fast.training import recipes  # noqa: E402

from support.real_model import (  # noqa: E402
    chat_tokens,
    crash_then_resume,
    logits_and_grads,
    quantized_transformers_model,
    random_gates,
    smollm2_folder,
)

LAYERS, P = 15, 4


@pytest.fixture(scope="module")
def smol():
    return smollm2_folder()


@pytest.fixture(scope="module")
def hf_nf4(smol):
    return quantized_transformers_model(smol, "nf4")


@pytest.fixture(scope="module")
def tokens(smol):
    return chat_tokens(smol)


@pytest.mark.parametrize("method", ["nf4", "int8", "torchao-int8"])
def test_zero_gates_give_the_logits_of_transformers_quantized_model(smol, tokens, method):
    if method == "torchao-int8":
        pytest.importorskip("torchao")
    theirs = quantized_transformers_model(smol, method)
    ours = LLaMAAdapter.from_hf(smol, adapter_len=P, adapter_layers=LAYERS, attention_backend="sdpa",
                                quantize=method).eval()
    full = LLaMAAdapter.from_hf(smol, adapter_layers=0)
    # The blocks' linear layers hold 4/5 of SmolLM2's weights (its head is tied to the embedding).
    ratio = weight_bytes(ours) / weight_bytes(full)
    assert ratio < (0.5 if "int8" in method else 0.35), ratio
    with torch.no_grad():
        assert rel_error(ours(tokens), theirs(tokens).logits) < 1e-5


def test_the_peft_backend_on_a_kbit_prepared_4bit_model_matches_peft(hf_nf4, tokens, op_calls):
    """PEFT's own flow for quantized bases: prepare_model_for_kbit_training, then its
    adaption prompt; the fused backend gives PEFT's logits and gradients there."""
    pytest.importorskip("peft")
    from peft import AdaptionPromptConfig, get_peft_model, prepare_model_for_kbit_training

    from llama_adapter_fast.integrations.peft import enable_fused_adaption_prompt

    prepared = prepare_model_for_kbit_training(copy.deepcopy(hf_nf4), use_gradient_checkpointing=False)
    theirs = get_peft_model(prepared, AdaptionPromptConfig(adapter_len=P, adapter_layers=LAYERS,
                                                           task_type="CAUSAL_LM"))
    random_gates(theirs.named_parameters())
    ours = enable_fused_adaption_prompt(copy.deepcopy(theirs), backend="sdpa")
    results = []
    for model in (ours, theirs):
        params = [p for p in model.parameters() if p.requires_grad]
        assert len(params) == 2 * LAYERS
        results.append(logits_and_grads(model, tokens, params))
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
    crash_then_resume(cli, recipes, [*run, "--quantize", "nf4", "--out", str(tmp_path / "resumed")], monkeypatch)
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
