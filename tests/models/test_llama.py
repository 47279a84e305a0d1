"""The LLaMA-Adapter model: parity with transformers' LlamaForCausalLM, Meta checkpoints,
the adapter's effect, frozen weights, parameter counts, and the Triton path."""

from __future__ import annotations

import json

import pytest
import torch

from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.ops.testing import DEVICE, expect_launches, rel_error

transformers = pytest.importorskip("transformers")


def tiny_hf(n_kv_heads: int = 4, rope_scaling: dict | None = None, tie: bool = False, seed: int = 0):
    """A random LlamaForCausalLM with weights large enough that every part matters."""
    kwargs = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=n_kv_heads, vocab_size=101, rms_norm_eps=1e-5, max_position_embeddings=64,
                  tie_word_embeddings=tie, attn_implementation="eager")
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
        kwargs["rope_theta"] = 500000.0
    config = transformers.LlamaConfig(**kwargs)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return model


def tokens(B: int = 2, T: int = 13, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}


@pytest.mark.parametrize("case", ["mha", "gqa_llama3_rope"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_from_hf_matches_transformers_at_zero_gates(case, backend):
    hf = tiny_hf(n_kv_heads=4) if case == "mha" else tiny_hf(n_kv_heads=2, rope_scaling=LLAMA3)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        model = LLaMAAdapter.from_hf(hf, adapter_len=5, adapter_layers=2, attention_backend=backend)
        out = model(x)
    assert out.shape == ref.shape == (2, 13, 101)
    assert model.args.n_kv_heads == hf.config.num_key_value_heads
    assert rel_error(out, ref) < 1e-5


def test_from_hf_folder_loads_in_checkpoint_dtype_without_random_init(tmp_path, monkeypatch):
    hf = tiny_hf(n_kv_heads=2, tie=True)
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
    hf.save_pretrained(tmp_path / "f32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")

    real_normal = torch.nn.init.normal_

    def only_meta(tensor, *args, **kwargs):  # the base must never be randomly initialized
        assert tensor.device.type == "meta", "a real tensor was randomly initialized while loading"
        return real_normal(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", only_meta)
    model = LLaMAAdapter.from_hf(tmp_path / "f32", adapter_len=4, adapter_layers=3)
    assert model.args.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        assert rel_error(model(x), ref) < 1e-5
    low = LLaMAAdapter.from_hf(tmp_path / "bf16", adapter_len=4, adapter_layers=3)
    assert low.layers[0].attention.wq.weight.dtype == torch.bfloat16
    assert low.layers[2].attention.adapter_prompt.dtype == torch.float32  # trainable tensors stay float32
    assert all(p.device.type == "cpu" for p in low.parameters())
    with torch.no_grad():
        assert low(x).dtype == torch.bfloat16


def test_save_hf_is_read_by_transformers(tmp_path):
    hf = tiny_hf(n_kv_heads=2, rope_scaling=LLAMA3)
    model = LLaMAAdapter.from_hf(hf, adapter_layers=1)
    model.save_hf(tmp_path)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = tokens()
    with torch.no_grad():
        assert rel_error(again(x).logits, hf(x).logits) < 1e-6


# -- Meta format --------------------------------------------------------------------------


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' conversion permutation: rotate-half rows back to interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_checkpoint(hf) -> tuple[dict, dict]:
    c = hf.config
    sd = hf.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"], "rope.freqs": torch.zeros(8)}
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
             "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf_name, meta_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if meta_name == "attention.wq":
                w = hf_to_meta_rows(w, c.num_attention_heads)
            elif meta_name == "attention.wk":
                w = hf_to_meta_rows(w, c.num_key_value_heads)
            out[f"layers.{i}.{meta_name}.weight"] = w.clone()
    # LLaMA 1/2 params.json: vocab_size -1 (set by the tokenizer), FFN width from multiple_of.
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "norm_eps": c.rms_norm_eps,
              "max_batch_size": 32, "max_seq_len": 64,
              # Meta's FFN rule, int(0.5 * 2/3 * 4 * 64) = 85 rounded up to 96, matches intermediate_size.
              "ffn_dim_multiplier": 0.5}
    return out, params


def test_meta_permutation_matches_metas_interleaved_rotary():
    """The oracle of the conversion: scores of Meta's complex-number rotary on Meta rows
    equal those of the rotate-half rotary on Hugging Face rows."""
    hf = tiny_hf(n_kv_heads=4)
    attn = hf.model.layers[0].self_attn
    H, D, T = 4, 16, 7
    x = torch.randn(T, 64, dtype=torch.float64)
    wq, wk = attn.q_proj.weight.double(), attn.k_proj.weight.double()
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)

    def meta_rot(w):  # Meta: consecutive pairs are complex numbers
        z = torch.view_as_complex((x @ hf_to_meta_rows(w, H).T).reshape(T, H, D // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(T, H, D)

    def hf_rot(w):  # rotate half
        y = (x @ w.T).reshape(T, H, D)
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
        return y * cos + torch.cat([-y[..., D // 2:], y[..., : D // 2]], -1) * sin

    meta_scores = torch.einsum("thd,shd->hts", meta_rot(wq), meta_rot(wk))
    hf_scores = torch.einsum("thd,shd->hts", hf_rot(wq), hf_rot(wk))
    assert torch.allclose(meta_scores, hf_scores, atol=1e-10)


def test_from_meta_round_trip(tmp_path):
    hf = tiny_hf(n_kv_heads=2)
    state, params = meta_checkpoint(hf)
    folder = tmp_path / "meta"
    folder.mkdir()
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params))

    model = LLaMAAdapter.from_meta(folder, adapter_len=3, adapter_layers=2)
    assert model.args.vocab_size == 101 and model.args.ffn_hidden_dim == 96
    x = tokens()
    with torch.no_grad():
        assert rel_error(model(x), hf(x).logits) < 1e-5

    model.save_meta(tmp_path / "again")
    saved = torch.load(tmp_path / "again" / "consolidated.00.pth", weights_only=True)
    for name, t in state.items():
        if name != "rope.freqs":
            assert torch.equal(saved[name], t), name
    again = LLaMAAdapter.from_meta(tmp_path / "again", adapter_layers=2)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_from_meta_merges_model_parallel_shards(tmp_path):
    hf = tiny_hf(n_kv_heads=2)
    state, params = meta_checkpoint(hf)
    shards = [{}, {}]
    for name, t in state.items():
        if t.dim() == 1:
            parts = [t, t]
        elif name == "tok_embeddings.weight" or name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(2, dim=1)  # LLaMA 1/2 split the embedding and row-parallel weights on dim 1
        else:
            parts = t.chunk(2, dim=0)
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{i:02d}.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = LLaMAAdapter.from_meta(tmp_path, adapter_layers=1)
    x = tokens()
    with torch.no_grad():
        assert rel_error(model(x), hf(x).logits) < 1e-5


# -- the adapter ----------------------------------------------------------------------------


def small(**kw) -> LLaMAAdapter:
    torch.manual_seed(0)
    args = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=64,
                adapter_len=5, adapter_layers=2, attention_backend="sdpa")
    args.update(kw)
    return LLaMAAdapter(ModelArgs(**args))


@pytest.mark.parametrize("gate_activation,scalar_gate", [("tanh", False), ("identity", True)])
def test_nonzero_gates_change_the_logits(gate_activation, scalar_gate):
    model = small(gate_activation=gate_activation, scalar_gate=scalar_gate)
    x = tokens(vocab=50)
    plain = small(adapter_layers=0)
    with torch.no_grad():
        base = plain(x)
        zero = model(x)
        assert torch.allclose(zero, base, atol=1e-6)  # zero gates: exactly the base model
        for attn in model.adapter_layers():
            assert attn.gate.shape == (() if scalar_gate else (4,))
            attn.gate.fill_(0.5)
        changed = model(x)
    assert (changed - base).abs().max() > 1e-2


def test_frozen_weights_get_no_gradient():
    model = small()
    with torch.no_grad():
        for attn in model.adapter_layers():
            attn.gate.fill_(0.3)
    model(tokens(vocab=50)).float().logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{k}" for i in (1, 2) for k in ("adapter_prompt", "gate")}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_paper_parameter_count_for_llama_7b():
    with torch.device("meta"):
        model = LLaMAAdapter(ModelArgs(adapter_len=10, adapter_layers=30))
    assert model.layers[0].feed_forward.w1.weight.shape == (11008, 4096)
    n = model.num_adapter_parameters()
    assert n == 30 * 10 * 4096 + 30 * 32  # prompts + per-head gates
    assert 1.2e6 < n < 1.25e6
    assert sum(p.numel() for p in model.parameters()) - n == 6_738_415_616  # LLaMA-7B


def test_adapter_state_dict_save_and_load(tmp_path):
    model = small()
    with torch.no_grad():
        for attn in model.adapter_layers():
            attn.gate.normal_()
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(path)
    assert read_adapter_config(path) == {"adapter_len": 5, "adapter_layers": 2, "gate_activation": "tanh",
                                         "scalar_gate": False}
    other = small()
    other.reset_adapter(torch.Generator().manual_seed(5))
    other.load_adapter(path)
    for (n, a), (_, b) in zip(model.adapter_state_dict().items(), other.adapter_state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    # The original LLaMA-Adapter's file: one embedding of all prompts, gates (1, H, 1, 1).
    sd = model.adapter_state_dict()
    original = {"adapter_query.weight": torch.cat([sd["layers.1.attention.adapter_prompt"],
                                                    sd["layers.2.attention.adapter_prompt"]])}
    for i in range(3):
        original[f"layers.{i}.attention.gate"] = torch.zeros(1, 4, 1, 1)
    original["layers.2.attention.gate"] = sd["layers.2.attention.gate"].reshape(1, 4, 1, 1)
    torch.save(original, tmp_path / "original.pth")
    third = small()
    third.load_adapter(tmp_path / "original.pth")
    assert torch.equal(third.layers[2].attention.adapter_prompt, sd["layers.2.attention.adapter_prompt"])
    assert torch.equal(third.layers[2].attention.gate, sd["layers.2.attention.gate"])
    # convert writes it as this package's file (its settings given: its layer 1 gate is still zero)
    from llama_adapter_fast import cli

    assert cli.main(["convert", str(tmp_path / "original.pth"), "--out", str(tmp_path / "converted.safetensors"),
                     "--adapter-len", "5", "--adapter-layers", "2"]) == 0
    assert read_adapter_config(tmp_path / "converted.safetensors") == {
        "adapter_len": 5, "adapter_layers": 2, "gate_activation": "tanh", "scalar_gate": False}
    fourth = small()
    fourth.load_adapter(tmp_path / "converted.safetensors")
    for name, t in third.adapter_state_dict().items():
        assert torch.equal(fourth.adapter_state_dict()[name], t), name


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="adapter_layers"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, adapter_layers=3)
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=3, adapter_layers=1)
    with pytest.raises(ValueError, match="gate_activation"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, adapter_layers=1, gate_activation="relu")
    with pytest.raises(ValueError, match="rope_type"):
        ModelArgs(dim=64, n_layers=2, n_heads=4, adapter_layers=1, rope_scaling={"rope_type": "yarn", "factor": 2})
    model = small()
    with pytest.raises(ValueError, match="adapter weights do not match"):
        model.load_adapter(small(adapter_layers=3).adapter_state_dict())
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(small(adapter_len=7).adapter_state_dict())
    with pytest.raises(ValueError, match="config.json"):
        LLaMAAdapter.from_hf(tmp_path)
    with pytest.raises(ValueError, match="params.json"):
        LLaMAAdapter.from_meta(tmp_path)
    with pytest.raises(ValueError, match="tokens"):
        model(torch.randn(2, 3))


def test_triton_backend_runs_the_kernels():
    """The fused kernels (under Triton's interpreter on the CPU) give the model's logits and
    adapter gradients within the kernels' own float32 tolerance of the float64 eager model,
    on 37 tokens (three of the interpreter's 16-row blocks) with left padding; every adapted
    layer launches each kernel exactly once per call."""
    model = small(adapter_len=3, attention_backend="triton").to(DEVICE)
    reference = small(adapter_len=3, attention_backend="eager").double().to(DEVICE)
    with torch.no_grad():
        for layer, gate in zip(model.layers[1:], ([0.5, -0.4, 0.3, 0.8], [-0.7, 0.2, 0.6, -0.1]), strict=True):
            layer.attention.gate.copy_(torch.tensor(gate))
        for layer in model.layers:  # scores of order one, so that the attention weights matter
            layer.attention.wq.weight.mul_(4)
            layer.attention.wk.weight.mul_(4)
    reference.load_state_dict(model.state_dict())
    x = tokens(B=2, T=37, vocab=50).to(DEVICE)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, :5] = False
    adapted = model.args.adapter_layers
    with expect_launches("forward", "backward_prefix", "backward", times=adapted):
        out = model(x, key_padding_mask=mask)
        out[mask].logsumexp(-1).mean().backward()
    ref = reference(x, key_padding_mask=mask)
    ref[mask].logsumexp(-1).mean().backward()
    assert rel_error(out[mask], ref[mask]) < 2e-5
    for (n, p), (_, q) in zip(model.adapter_parameters(), reference.adapter_parameters(), strict=True):
        assert rel_error(p.grad, q.grad) < 2e-5, n


def test_a_base_folder_loads_what_its_index_names_and_nothing_else(tmp_path):
    from safetensors.torch import load_file, save_file

    base = small(adapter_layers=0)
    base.save_hf(tmp_path / "one")
    small().save_adapter(tmp_path / "one" / "adapter.safetensors")  # an extra file beside the weights
    x = torch.randint(0, 50, (1, 7))
    loaded = LLaMAAdapter.from_hf(tmp_path / "one", adapter_layers=0)
    with torch.no_grad():
        assert torch.equal(loaded(x), base(x))

    # Sharded: the index names the shards; a stray file beside them is not read.
    state = load_file(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file({"junk": torch.zeros(1)}, str(sharded / "stray.safetensors"))
    with torch.no_grad():
        assert torch.equal(LLaMAAdapter.from_hf(sharded, adapter_layers=0)(x), base(x))

    # Index entries that leave the folder are refused.
    for outside in ("../one/model.safetensors", str(tmp_path / "one" / "model.safetensors")):
        bad = {"weight_map": {**index["weight_map"], names[0]: outside}}
        (sharded / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="outside"):
            LLaMAAdapter.from_hf(sharded, adapter_layers=0)
    (sharded / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        LLaMAAdapter.from_hf(sharded, adapter_layers=0)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        LLaMAAdapter.from_hf(sharded, adapter_layers=0)  # shards without their index
