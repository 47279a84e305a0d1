"""litgpt's adapter and adapter_v2 checkpoints, as litgpt's own save functions write them,
read into this package's model with litgpt's logits on the same base."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("litgpt")

import litgpt.adapter as lit_adapter
import litgpt.adapter_v2 as lit_adapter_v2
from lightning import Fabric
from litgpt.finetune.adapter import save_adapter_checkpoint
from litgpt.finetune.adapter_v2 import save_adapter_v2_checkpoint
from litgpt.scripts.convert_hf_checkpoint import copy_weights_hf_llama
from safetensors.torch import load_file

from llama_adapter_fast import cli
from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.ops.testing import rel_error

FLAVOURS = {"adapter": (lit_adapter, save_adapter_checkpoint),
            "adapter_v2": (lit_adapter_v2, save_adapter_v2_checkpoint)}


@pytest.fixture(scope="module", params=[(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def base(request, tmp_path_factory):
    """A random LLaMA saved as a Hugging Face folder, and litgpt's config of it."""
    heads, groups = request.param
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=3, n_heads=heads, n_kv_heads=groups, vocab_size=64, multiple_of=16,
                     max_seq_len=32, adapter_layers=0)
    folder = tmp_path_factory.mktemp("base")
    LLaMAAdapter(args).save_hf(folder)
    config = dict(name="tiny", n_embd=32, n_layer=3, n_head=heads, n_query_groups=groups,
                  intermediate_size=args.ffn_hidden_dim, vocab_size=64, padded_vocab_size=64, block_size=32,
                  rotary_percentage=1.0, parallel_residual=False, bias=False, norm_class_name="RMSNorm",
                  norm_eps=args.norm_eps, mlp_class_name="LLaMAMLP", rope_base=int(args.rope_theta),
                  adapter_prompt_length=3, adapter_start_layer=1)
    return folder, config


def litgpt_model(base, flavour):
    folder, config = base
    module, _ = FLAVOURS[flavour]
    lit_config = module.Config(**config)
    model = module.GPT(lit_config)
    state: dict = {}
    copy_weights_hf_llama(lit_config, {}, state, load_file(str(folder / "model.safetensors")))  # litgpt's converter
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert all(module.adapter_filter(k, None) for k in missing)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if module.adapter_filter(name, p):
                p.add_(torch.randn(p.shape) * (0.3 if "adapter_scale" in name or "norm" in name or "ln_f" in name
                                               else 1.0))
    return model.eval()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_litgpt_checkpoint_gives_litgpts_logits(base, flavour, tmp_path):
    model = litgpt_model(base, flavour)
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / f"lit_model.pth.{flavour}"
    FLAVOURS[flavour][1](Fabric(accelerator="cpu", devices=1), model, path)  # litgpt's own writer

    settings = read_adapter_config(path)
    assert settings["prefix_projection"] == "litgpt" and settings["adapter_layers"] == 2
    assert settings["gate_activation"] == "identity" and not settings["scalar_gate"]
    if flavour == "adapter_v2":
        assert settings["bias_tuning"] == ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]
        assert settings["norm_tuning"] and settings["scale_tuning"] == "output"
    ours = LLaMAAdapter.from_hf(base[0], attention_backend="sdpa", **settings)
    ours.load_adapter(path)
    with torch.no_grad():
        assert rel_error(ours(x), ref) < 1e-5
    # and as this package's file
    assert cli.main(["convert", str(path), "--out", str(tmp_path / "ours.safetensors")]) == 0
    settings = read_adapter_config(tmp_path / "ours.safetensors")
    again = LLaMAAdapter.from_hf(base[0], attention_backend="sdpa", **settings)
    again.load_adapter(tmp_path / "ours.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_written_back_as_litgpt_it_loads_in_litgpt(base, flavour, tmp_path):
    """litgpt -> this package -> litgpt: litgpt's GPT loads the written checkpoint (its own
    load_state_dict) and gives the first model's logits."""
    model = litgpt_model(base, flavour)
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    FLAVOURS[flavour][1](Fabric(accelerator="cpu", devices=1), model, tmp_path / "lit.pth")
    assert cli.main(["convert", str(tmp_path / "lit.pth"), "--out", str(tmp_path / "ours.safetensors")]) == 0
    assert cli.main(["convert", str(tmp_path / "ours.safetensors"), "--out", str(tmp_path / "back.pth"),
                     "--to", "litgpt"]) == 0
    module, _ = FLAVOURS[flavour]
    fresh = litgpt_model(base, flavour)
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if module.adapter_filter(name, p):
                p.normal_()  # whatever was there: the checkpoint must overwrite all of it
    fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True)["model"], strict=False)
    with torch.no_grad():
        assert rel_error(fresh.eval()(x), ref) < 1e-6


def test_what_litgpt_cannot_hold_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    own = LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                 max_seq_len=32, adapter_layers=1, adapter_len=3))
    own.save_adapter(tmp_path / "own.safetensors")
    assert cli.main(["convert", str(tmp_path / "own.safetensors"), "--out", str(tmp_path / "x.pth"),
                     "--to", "litgpt"]) == 2
    err = capsys.readouterr().err
    assert "cannot be written as a litgpt checkpoint" in err and "other rows of its qkv projection" in err
    assert not (tmp_path / "x.pth").exists()


def test_finetune_resume_from_a_litgpt_checkpoint_keeps_litgpts_projection(base, tmp_path):
    """A new run from a litgpt checkpoint takes its settings, litgpt's prefix projection
    included (without it the same tensors would load into another model)."""
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.distributed import init_distributed
    from llama_adapter_fast.training.preflight import plan_finetune, read_resume_source
    from llama_adapter_fast.training.tokenizer import Tokenizer

    model = litgpt_model(base, "adapter")
    save_adapter_checkpoint(Fabric(accelerator="cpu", devices=1), model, tmp_path / "lit.pth")
    kind, read = read_resume_source(tmp_path / "lit.pth")
    assert kind == "adapter" and read.path == tmp_path / "lit.pth"
    cfg = TrainConfig(base=str(base[0]), data="unread.json", out_dir=str(tmp_path / "run"),
                      resume=str(tmp_path / "lit.pth"), template="alpaca")
    plan = plan_finetune(cfg, *init_distributed("cpu"), tokenizer=Tokenizer())
    assert plan.start_from.path == tmp_path / "lit.pth" and plan.checkpoint is None
    assert (plan.cfg.prefix_projection, plan.cfg.gate_activation, plan.cfg.adapter_layers, plan.cfg.resume) == (
        "litgpt", "identity", 2, False)
