"""What `llama-adapter-fast serve` prepares for vLLM, without vLLM: the model folder (the
base's files linked, config.json naming the architecture and the adapter) and the refusals
that come before any server starts. The served model itself is tested in vLLM's own
environment (tests/vllm_plugin, `make test-vllm`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llama_adapter_fast import cli
from llama_adapter_fast.integrations.vllm import ARCHITECTURE, lora_folder, served_model_folder
from llama_adapter_fast.integrations.vllm.folder import ADAPTER_FILE
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter, read_adapter_config, with_own_names
from llama_adapter_fast.models.llama import LLaMAAdapter

transformers = pytest.importorskip("transformers")


def hf_base(tmp_path, name: str = "base", layers: int = 3, **config):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=61, **config)
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
    with pytest.raises(ValueError, match=r"bias and scale on \['output'\] cannot be folded"):
        served_model_folder(base, adapter(tmp_path, bias_tuning=("wq", "output")), tmp_path / "b")
    with pytest.raises(ValueError, match="cannot share a base with other adapters"):
        lora_folder(base, adapter(tmp_path, bias_tuning=("wq",)), tmp_path / "b")
    with pytest.raises(ValueError, match=r"this base has \['attention_bias'\]"):
        served_model_folder(hf_base(tmp_path, "biased", attention_bias=True), adapter(tmp_path, norm_tuning=True),
                            tmp_path / "b")
    assert not (tmp_path / "b").exists()
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
    tuned = adapter(tmp_path, norm_tuning=True)
    for argv, fragment in [
        (["--adapter", "noequals"], "expected NAME=FILE"),
        (["--adapter", f"a={file}", "--adapter", f"a={file}"], "need a name of their own"),
        (["--adapter", f"base={file}"], "need a name of their own"),  # the base's own name
        (["--adapter", f"a={file}", "--adapter", f"b={longer}"], "adapter_len 6 (served: 4)"),
        (["--adapter", f"a={tmp_path / 'missing.safetensors'}"], "does not exist"),
        (["--adapter", f"a={tuned}", "--adapter", f"b={file}"], "serve it alone"),
        (["--adapter", f"a={tuned}", "--base-name", "smol"], "serve it alone"),
    ]:
        assert cli.main(["serve", "--base", str(base), *argv]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, err
    if importlib.util.find_spec("vllm") is None:  # this environment; vLLM's own serves instead
        assert cli.main(["serve", "--base", str(base), "--adapter", f"a={file}"]) == 2
        assert "serving needs vLLM" in capsys.readouterr().err


@pytest.mark.parametrize("placement", ["output", "input", "none"])
def test_v2_tuning_folds_exactly_into_a_llama_with_biases(tmp_path, placement):
    """V2's bias, scale and norm tuning, folded into the base's weights for a model folder
    that turns on the attention and MLP biases, is the package's tuned model: transformers'
    own Llama on the folded weights gives its logits (gates shut, so only the tuning acts)."""
    import torch
    from safetensors.torch import load_file

    from llama_adapter_fast.integrations.vllm.fold import fold_tuning

    base = hf_base(tmp_path)
    model = LLaMAAdapter.from_hf(base, adapter_len=4, adapter_layers=2, bias_tuning=("wq", "wk", "wo", "w2"),
                                 scale_tuning=placement, norm_tuning=True, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.adapter_parameters():
            if not name.endswith("gate"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_adapter(tmp_path / "tuned.safetensors")
    folder = served_model_folder(base, tmp_path / "tuned.safetensors", tmp_path / "served")
    config = json.loads((folder / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    settings = read_adapter_config(tmp_path / "tuned.safetensors")
    state = with_own_names(read_adapter(tmp_path / "tuned.safetensors").state, 2)  # as vLLM's model reads it
    folded = dict(fold_tuning(load_file(base / "model.safetensors").items(), state, settings, 3))
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(folder)).eval()
    theirs.load_state_dict(folded, strict=True)  # every bias present, none unexpected
    assert not folded["model.layers.0.mlp.gate_proj.bias"].any()  # untuned layers: zero biases
    tokens = torch.randint(0, 61, (2, 9), generator=g)
    with torch.no_grad():
        expected = model.eval()(tokens)
        assert not torch.allclose(expected, LLaMAAdapter.from_hf(base, adapter_len=4, adapter_layers=2)(tokens))
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_serve_runs_a_v2_adapter_alone_with_its_tuning_folded(tmp_path, monkeypatch):
    """`serve` with an adapter that has V2's tuning: vLLM's server on a model folder that
    names it (biases on), under the adapter's name, without the base or vLLM's LoRA path.
    vLLM itself is stubbed here (its own environment runs the served model)."""
    import subprocess

    import llama_adapter_fast.integrations.vllm as plugin

    base, tuned = hf_base(tmp_path), adapter(tmp_path, bias_tuning=("wq", "w2"), norm_tuning=True)
    seen = {}

    def fake_server(command, env):
        folder = command[command.index("--model") + 1]
        seen.update(command=command, config=json.loads((Path(folder) / "config.json").read_text()))
        return 0

    monkeypatch.setattr(plugin, "check_vllm", lambda: "0.32.0")
    monkeypatch.setattr(subprocess, "call", fake_server)
    assert cli.main(["serve", "--base", str(base), "--adapter", f"tuned={tuned}", "--", "--port", "8123"]) == 0
    command, config = seen["command"], seen["config"]
    assert command[command.index("--served-model-name") + 1] == "tuned" and command[-2:] == ["--port", "8123"]
    assert "--enable-lora" not in command and "--lora-modules" not in command
    assert config["llama_adapter"] == {"path": str(tuned.resolve())}
    assert config["attention_bias"] and config["mlp_bias"]
