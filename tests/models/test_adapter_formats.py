"""Adapters in PEFT's format: read from folders PEFT's own save_pretrained wrote, written
as folders PEFT's own from_pretrained loads, logits compared with PEFT's forward."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("peft")

from peft import AdaptionPromptConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from llama_adapter_fast import cli
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.ops.testing import rel_error
from llama_adapter_fast.training.bases import load_base


def tokens() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_base(base_dir):
    return LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()


def test_a_peft_folder_gives_peft_logits(base_dir, tmp_path, capsys):
    torch.manual_seed(0)
    peft_model = get_peft_model(hf_base(base_dir), AdaptionPromptConfig(adapter_len=3, adapter_layers=1,
                                                                        task_type="CAUSAL_LM")).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_prompt"):
                p.normal_()
            elif name.endswith("adaption_gate"):
                p.uniform_(-1.5, 1.5)
    peft_model.save_pretrained(tmp_path / "peft")  # PEFT's own writer
    with torch.no_grad():
        ref = peft_model(input_ids=tokens()).logits

    settings = read_adapter_config(tmp_path / "peft")
    assert settings == {"adapter_len": 3, "adapter_layers": 1, "gate_activation": "identity", "scalar_gate": True}
    model = load_base(base_dir, attention_backend="sdpa", **settings)
    model.load_adapter(tmp_path / "peft")
    with torch.no_grad():
        assert rel_error(model(tokens()), ref) < 1e-5

    # convert writes this package's file, which gives the same logits
    assert cli.main(["convert", str(tmp_path / "peft"), "--out", str(tmp_path / "ours.safetensors")]) == 0
    again = load_base(base_dir, attention_backend="sdpa", **read_adapter_config(tmp_path / "ours.safetensors"))
    again.load_adapter(tmp_path / "ours.safetensors")
    with torch.no_grad():
        assert torch.equal(again(tokens()), model(tokens()))
    # generate takes the folder as it is
    assert cli.main(["generate", "--base", str(base_dir), "--adapter", str(tmp_path / "peft"), "--prompt", "Hello",
                     "--max-new-tokens", "2", "--device", "cpu", "--attention-backend", "sdpa"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("gates", ["identity-scalar", "tanh-scalar", "tanh-equal-heads"])
def test_an_adapter_written_as_peft_loads_in_peft_with_the_same_logits(base_dir, tmp_path, gates):
    activation, scalar = ("identity", True) if gates == "identity-scalar" else ("tanh", gates == "tanh-scalar")
    torch.manual_seed(1)
    model = load_base(base_dir, attention_backend="sdpa", adapter_len=4, adapter_layers=2,
                      gate_activation=activation, scalar_gate=scalar)
    with torch.no_grad():
        for attn in model.adapter_layers():
            attn.adapter_prompt.normal_()
            attn.gate.fill_(float(torch.empty(()).uniform_(-1.5, 1.5)))  # per head: every head the same
        ours = model(tokens())
    model.save_adapter(tmp_path / "a.safetensors")
    assert cli.main(["convert", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "peft"), "--to", "peft",
                     "--base-model", str(base_dir)]) == 0
    loaded = PeftModel.from_pretrained(hf_base(base_dir), tmp_path / "peft").eval()  # PEFT's own reader
    assert loaded.peft_config["default"].adapter_len == 4
    with torch.no_grad():
        assert rel_error(loaded(input_ids=tokens()).logits, ours) < 1e-5
    # and this package reads back the folder it wrote (it used to refuse target_modules null)
    assert cli.main(["convert", str(tmp_path / "peft"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back = load_base(base_dir, attention_backend="sdpa", **read_adapter_config(tmp_path / "back.safetensors"))
    back.load_adapter(tmp_path / "back.safetensors")
    with torch.no_grad():
        assert rel_error(back(tokens()), ours) < 1e-5


def test_what_peft_cannot_hold_is_refused_and_nothing_is_written(base_dir, tmp_path, capsys):
    torch.manual_seed(2)
    per_head = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1)
    with torch.no_grad():
        per_head.adapter_layers()[0].gate.copy_(torch.tensor([0.3, -0.7]))
    per_head.save_adapter(tmp_path / "heads.safetensors")
    v2 = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1, scalar_gate=True,
                   bias_tuning=("wq",))
    v2.save_adapter(tmp_path / "v2.safetensors")
    for source, message in (("heads", "its gates are per head .* PEFT keeps one gate per layer"),
                            ("v2", "LLaMA-Adapter V2's biases, scales or norms.*would be lost")):
        out = tmp_path / f"{source}-peft"
        assert cli.main(["convert", str(tmp_path / f"{source}.safetensors"), "--out", str(out), "--to", "peft"]) == 2
        err = capsys.readouterr().err
        assert "cannot be written in PEFT's format" in err and re.search(message, err), err
        assert not out.exists()


def test_bad_peft_folders_are_named(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="peft_type 'LORA'; only ADAPTION_PROMPT"):
        read_adapter_config(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file .*no adapter_config.json"):
        read_adapter_config(empty)


def test_finetune_resume_starts_a_new_run_from_an_adapter_of_any_format(base_dir, data_file, tmp_path, capsys):
    """--resume with a PEFT folder, or the same adapter converted to this package's file:
    a new run from its weights (step 0, its settings), the two runs bit for bit the same,
    and another start than a fresh adapter's."""
    from safetensors.torch import load_file

    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import finetune

    torch.manual_seed(3)
    peft_model = get_peft_model(hf_base(base_dir), AdaptionPromptConfig(adapter_len=3, adapter_layers=2,
                                                                        task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if name.endswith("adaption_gate"):
                p.fill_(0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    assert cli.main(["convert", str(tmp_path / "peft"), "--out", str(tmp_path / "ours.safetensors")]) == 0

    def run(out, **kw):
        return finetune(TrainConfig(base=str(base_dir), data=str(data_file), out_dir=str(tmp_path / out),
                                    attention_backend="sdpa", max_seq_len=80, batch_size=2, max_steps=2, lr=1e-2,
                                    progress=False, plot=False, device="cpu", **kw))

    from_peft = run("from-peft", resume=str(tmp_path / "peft"))
    assert "resume: a new run from the adapter" in capsys.readouterr().out
    from_ours = run("from-ours", resume=str(tmp_path / "ours.safetensors"))
    fresh = run("fresh", adapter_len=3, adapter_layers=2, gate_activation="identity", scalar_gate=True)
    assert from_peft.first_loss == from_ours.first_loss != fresh.first_loss
    a, b = (load_file(str(tmp_path / d / "adapter.safetensors")) for d in ("from-peft", "from-ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_adapter_config(tmp_path / "from-peft" / "adapter.safetensors")["gate_activation"] == "identity"


def test_convert_writes_over_nothing_without_consent(base_dir, tmp_path, capsys):
    """convert used to overwrite an existing --out, the source itself included."""
    model = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1)
    source = tmp_path / "a.safetensors"
    model.save_adapter(source)
    before = source.read_bytes()
    assert cli.main(["convert", str(source), "--out", str(source)]) == 2
    assert "is the source" in capsys.readouterr().err
    assert cli.main(["convert", str(source), "--out", str(source), "--overwrite"]) == 2
    assert source.read_bytes() == before
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"mine")
    assert cli.main(["convert", str(source), "--out", str(taken)]) == 2
    assert "--overwrite" in capsys.readouterr().err and taken.read_bytes() == b"mine"
    for to, out in (("peft", tmp_path / "peft"), ("original", tmp_path / "a.pth")):
        assert cli.main(["convert", str(source), "--out", str(out), "--to", to]) == 0
        assert cli.main(["convert", str(source), "--out", str(out), "--to", to]) == 2
        assert cli.main(["convert", str(source), "--out", str(out), "--to", to, "--overwrite"]) == 0
    assert cli.main(["convert", str(tmp_path / "peft"), "--out", str(tmp_path / "peft" / "x.safetensors")]) == 2
    assert cli.main(["convert", str(source), "--out", str(taken), "--overwrite"]) == 0
    assert read_adapter_config(taken) == read_adapter_config(source)


def test_load_adapter_refuses_a_file_of_other_settings(base_dir, tmp_path):
    """load_adapter used to check shapes only: a PEFT folder (identity gate) or a litgpt-
    projection adapter loaded into a model built with the defaults and computed another model."""
    peft_style = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1,
                           gate_activation="identity", scalar_gate=True)
    peft_style.save_adapter(tmp_path / "identity.safetensors")
    lit_style = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1,
                          prefix_projection="litgpt")
    lit_style.save_adapter(tmp_path / "litgpt.safetensors")
    default_scalar = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1, scalar_gate=True)
    default = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=1)
    before = {k: v.clone() for k, v in default_scalar.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="gate_activation 'identity', the model has 'tanh'"):
        default_scalar.load_adapter(tmp_path / "identity.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in default_scalar.adapter_state_dict().items())
    with pytest.raises(ValueError, match="prefix_projection 'litgpt', the model has 'own'"):
        default.load_adapter(tmp_path / "litgpt.safetensors")
    # built from the file's own settings, each loads
    for name in ("identity", "litgpt"):
        path = tmp_path / f"{name}.safetensors"
        load_base(base_dir, attention_backend="sdpa", **read_adapter_config(path)).load_adapter(path)
