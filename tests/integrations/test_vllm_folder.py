"""What `llama-adapter-fast serve` prepares for vLLM, without vLLM: the model folder (the
base's files linked, config.json naming the architecture and the adapter) and the refusals
that come before any server starts. The served model itself is tested in vLLM's own
environment (tests/vllm_plugin, `make test-vllm`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llama_adapter_fast import cli
from llama_adapter_fast.integrations.vllm import ARCHITECTURE, lora_folder, served_model_folder
from llama_adapter_fast.integrations.vllm.folder import ADAPTER_FILE
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.models.llama import LLaMAAdapter

transformers = pytest.importorskip("transformers")


def hf_base(tmp_path, name: str = "base", layers: int = 3):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=61)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / name)
    return tmp_path / name


def adapter(tmp_path, layers: int = 3, dim: int = 32, **kw):
    args = ModelArgs(dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=61, adapter_len=4,
                     adapter_layers=2, **kw)
    path = tmp_path / f"adapter-{dim}-{len(kw)}.safetensors"
    LLaMAAdapter(args).save_adapter(path)
    return path


def test_the_folder_links_the_base_and_names_the_adapter(tmp_path):
    base, file = hf_base(tmp_path), adapter(tmp_path)
    folder = served_model_folder(base, file, tmp_path / "served")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["llama_adapter"] == {"path": str(file.resolve())}
    assert (folder / "model.safetensors").is_symlink()
    assert (folder / "model.safetensors").resolve() == (base / "model.safetensors").resolve()
    assert json.loads((base / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]  # untouched


def test_the_lora_folder_adds_nothing_and_carries_the_adapter(tmp_path):
    from safetensors.torch import load_file

    base, file = hf_base(tmp_path), adapter(tmp_path)
    folder = lora_folder(base, file, tmp_path / "lora")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["target_modules"]) == ("LORA", 1, ["o_proj"])
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all(not w.any() for w in weights.values())  # zeros: the LoRA adds exactly nothing
    assert (folder / ADAPTER_FILE).resolve() == file.resolve()
    settings = read_adapter_config(file)
    served = served_model_folder(base, None, tmp_path / "served", settings=settings)
    recorded = json.loads((served / "config.json").read_text())["llama_adapter"]
    assert recorded == {k: settings[k] for k in ("adapter_len", "adapter_layers", "gate_activation", "scalar_gate")}


def test_refusals_name_what_is_wrong(tmp_path, capsys):
    base = hf_base(tmp_path)
    with pytest.raises(ValueError, match="is for another base"):
        served_model_folder(base, adapter(tmp_path, dim=64), tmp_path / "a")
    with pytest.raises(ValueError, match="bias, scale and norm tuning"):
        served_model_folder(base, adapter(tmp_path, bias_tuning=("wq",)), tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        served_model_folder(base, adapter(tmp_path), tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="has no config.json"):
        served_model_folder(tmp_path / "full", adapter(tmp_path), tmp_path / "c")
    file = adapter(tmp_path)
    longer = tmp_path / "longer.safetensors"
    LLaMAAdapter(ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, adapter_len=6,
                           adapter_layers=2)).save_adapter(longer)
    for argv, fragment in [
        (["--adapter", "noequals"], "expected NAME=FILE"),
        (["--adapter", f"a={file}", "--adapter", f"a={file}"], "need a name of their own"),
        (["--adapter", f"base={file}"], "need a name of their own"),  # the base's own name
        (["--adapter", f"a={file}", "--adapter", f"b={longer}"], "adapter_len 6 (served: 4)"),
        (["--adapter", f"a={tmp_path / 'missing.safetensors'}"], "does not exist"),
    ]:
        assert cli.main(["serve", "--base", str(base), *argv]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    if importlib.util.find_spec("vllm") is None:  # this environment; vLLM's own serves instead
        assert cli.main(["serve", "--base", str(base), "--adapter", f"a={file}"]) == 2
        assert "serving needs vLLM" in capsys.readouterr().err
