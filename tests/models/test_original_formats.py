"""The original LLaMA-Adapter releases' files (V1, the V2 65B chat release, the V2 7B
release's language model): read into this package's model with the logits of an eager
reference of the original code (float64, but for its float32 norms and rotary embeddings)
on the same Meta-format base, written back losslessly,
refused where the original cannot hold an adapter."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llama_adapter_fast import cli
from llama_adapter_fast.cli.convert import convert_adapter
from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
from llama_adapter_fast.models.formats.native import read_adapter_config, read_adapter_file
from llama_adapter_fast.models.formats.original import original_to_ours, write_original_adapter
from llama_adapter_fast.ops.testing import rel_error

DIM, LAYERS, HEADS, VOCAB, P = 32, 3, 4, 64, 3
LINEARS = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w2", "w3")}


# -- an eager reference of the original code (llama_adapter_v2_chat65b/llama/model.py; V1 and
#    the 7B release are the same equations with fewer biases and no scales) --------------------

def _rms(x, w, eps):  # in float32, as the original
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _rotary(x, freqs):  # Meta's complex rotation of interleaved pairs, in float32 as the original
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).type_as(x)


def original_logits(base: dict, adapter: dict, tokens: torch.Tensor, adapter_layers: int, eps: float,
                    gate_activation=torch.tanh) -> torch.Tensor:
    """The original Transformer.forward: `base` in Meta's names, `adapter` in the chat
    release's (adapter_query.weight, layers.N.attention.gate, <linear>_bias, <linear>_scale,
    the norms), all in float64."""
    sd = {**base, **adapter}
    B, T = tokens.shape
    head = DIM // HEADS
    inv = 1.0 / (10000.0 ** (torch.arange(0, head, 2).float() / head))
    freqs = torch.polar(torch.ones(T, head // 2), torch.outer(torch.arange(T).float(), inv))
    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)
    prompts = adapter["adapter_query.weight"].reshape(adapter_layers, -1, DIM)

    def linear(x, prefix, name):
        if (s := sd.get(f"{prefix}.{name}_scale")) is not None:
            x = x * s
        x = x @ sd[f"{prefix}.{name}.weight"].T
        return x + b if (b := sd.get(f"{prefix}.{name}_bias")) is not None else x

    def attend(q, k, v, m=None):
        scores = q @ k.transpose(2, 3) / math.sqrt(head)
        return F.softmax(scores + (m if m is not None else 0), -1) @ v

    h = sd["tok_embeddings.weight"][tokens]
    for i in range(LAYERS):
        a, f = f"layers.{i}.attention", f"layers.{i}.feed_forward"
        x = _rms(h, sd[f"layers.{i}.attention_norm.weight"], eps)
        q, k, v = (linear(x, a, w).view(B, T, HEADS, head) for w in ("wq", "wk", "wv"))
        q, k = _rotary(q, freqs), _rotary(k, freqs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = attend(q, k, v, mask)
        if i >= LAYERS - adapter_layers:
            prompt = prompts[i - (LAYERS - adapter_layers)]
            pk, pv = (linear(prompt, a, w).view(1, -1, HEADS, head).transpose(1, 2) for w in ("wk", "wv"))
            out = out + gate_activation(sd[f"{a}.gate"]) * attend(q, pk, pv)
        h = h + linear(out.transpose(1, 2).reshape(B, T, DIM), a, "wo")
        x = _rms(h, sd[f"layers.{i}.ffn_norm.weight"], eps)
        h = h + linear(F.silu(linear(x, f, "w1")) * linear(x, f, "w3"), f, "w2")
    return _rms(h, sd["norm.weight"], eps) @ sd["output.weight"].T


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random LLaMA in Meta's format (params.json + consolidated.00.pth) and its tensors."""
    torch.manual_seed(0)
    args = ModelArgs(dim=DIM, n_layers=LAYERS, n_heads=HEADS, vocab_size=VOCAB, multiple_of=16, max_seq_len=32,
                     adapter_layers=0)
    folder = tmp_path_factory.mktemp("meta")
    model = LLaMAAdapter(args).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn(p.shape))  # norms that are not all ones
    model.save_meta(folder)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    return folder, {k: v.double() for k, v in state.items()}, args


GENERATOR = torch.Generator().manual_seed(1)


def _random(shape, scale=1.0, around=0.0):
    return (around + scale * torch.randn(shape, generator=GENERATOR, dtype=torch.float64)).float()


def original_adapter(base_state, layers=2, biases=(), scales=False, norms=(), gates_everywhere=False):
    """An adapter as the original code holds it, in the chat release's names, with every
    trainable tensor away from its initial value (float32, as the original trains them)."""
    sd = {"adapter_query.weight": _random((layers * P, DIM))}
    for i in range(LAYERS):
        if i >= LAYERS - layers:
            sd[f"layers.{i}.attention.gate"] = _random((1, HEADS, 1, 1), 0.8)
        elif gates_everywhere:
            sd[f"layers.{i}.attention.gate"] = torch.zeros(1, HEADS, 1, 1)
        for block, names in LINEARS.items():
            for name in names:
                weight = base_state[f"layers.{i}.{block}.{name}.weight"]
                if name in biases:
                    sd[f"layers.{i}.{block}.{name}_bias"] = _random(weight.shape[0], 0.5)
                if name in biases and scales:
                    sd[f"layers.{i}.{block}.{name}_scale"] = _random(weight.shape[1], 0.2, 1.0)
        for norm in norms:
            if norm != "norm":
                sd[f"layers.{i}.{norm}.weight"] = _random(DIM, 0.2, 1.0)
    if "norm" in norms:
        sd["norm.weight"] = _random(DIM, 0.2, 1.0)
    return sd


def ours(base, settings, adapter_path):
    model = LLaMAAdapter.from_meta(base[0], dtype=torch.float64, attention_backend="eager", **settings)
    model.load_adapter(adapter_path)
    return model.eval()


TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
CHAT_65B = dict(biases=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), scales=True, norms=("attention_norm", "ffn_norm"))


def _reference(base, sd, layers=2, **kw):
    double = {k: v.double() for k, v in sd.items()}
    return original_logits(base[1], double, TOKENS, layers, base[2].norm_eps, **kw)


def _close(a, b):
    # float64 but for the norms and rotary embeddings, which both compute in float32
    assert rel_error(a, b) < 1e-6, rel_error(a, b)


# -- reading ----------------------------------------------------------------------------------

def test_the_65b_chat_release_gives_the_original_codes_logits(base, tmp_path):
    sd = original_adapter(base[1], **CHAT_65B)
    path = tmp_path / "chat65b.pth"
    torch.save({"model": sd}, path)
    settings = read_adapter_config(path)
    assert settings == {"adapter_len": P, "adapter_layers": 2, "scalar_gate": False, "gate_activation": "tanh",
                        "bias_tuning": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], "scale_tuning": "input",
                        "norm_tuning": True}
    model = ours(base, settings, path)
    # the release leaves the final norm untrained: the model keeps the base's
    assert torch.equal(model.norm.weight, base[1]["norm.weight"])
    with torch.no_grad():
        _close(model(TOKENS), _reference(base, sd))


def test_the_7b_releases_layout_and_v1_give_the_original_codes_logits(base, tmp_path):
    # The 7B release's language model: nn.Linear biases under `llama.`, every norm, gates in
    # every layer (the lowest untrained): adapter_layers is read from the trained gates.
    sd = original_adapter(base[1], biases=("wq", "wo", "w1", "w2", "w3"), norms=("attention_norm", "ffn_norm", "norm"),
                          gates_everywhere=True)
    seven_b = {("adapter_query.weight" if k == "adapter_query.weight" else "llama." + k.replace("_bias", ".bias")): v
               for k, v in sd.items()}
    path = tmp_path / "bias7b.pth"
    torch.save({"model": seven_b, "config": {"w_bias": True, "w_lora": False, "lora_rank": 16}}, path)
    settings = read_adapter_config(path)
    assert settings["bias_tuning"] == ["wq", "wo", "w1", "w2", "w3"] and settings["scale_tuning"] == "none"
    assert settings["norm_tuning"] and settings["adapter_layers"] == 2
    with torch.no_grad():
        _close(ours(base, settings, path)(TOKENS), _reference(base, sd))
    # V1: a plain dict, gates in every layer
    v1 = original_adapter(base[1], layers=1, gates_everywhere=True)
    torch.save(v1, tmp_path / "v1.pth")
    settings = read_adapter_config(tmp_path / "v1.pth")
    assert settings == {"adapter_len": P, "adapter_layers": 1, "scalar_gate": False, "gate_activation": "tanh"}
    with torch.no_grad():
        _close(ours(base, settings, tmp_path / "v1.pth")(TOKENS), _reference(base, v1, layers=1))
        # V1's first inference script applies the gate as it is
        settings = read_adapter_config(tmp_path / "v1.pth", gate_activation="identity")
        _close(ours(base, settings, tmp_path / "v1.pth")(TOKENS),
               _reference(base, v1, layers=1, gate_activation=lambda g: g))


def test_what_a_text_model_cannot_hold_is_refused(base, tmp_path):
    sd = original_adapter(base[1], biases=("wq",), norms=("norm",))
    cases = {"visual encoder": {"visual_query.weight": torch.zeros(P, 8), "clip_proj.weight": torch.zeros(8, 8)},
             "LoRA": {"layers.0.attention.lora_wq_l1.weight": torch.zeros(4, DIM)},
             "whole training checkpoint": {"layers.0.attention.wq.weight": torch.zeros(DIM, DIM)}}
    for words, extra in cases.items():
        torch.save({"model": {**sd, **extra}}, tmp_path / "x.pth")
        with pytest.raises(ValueError, match=words):
            read_adapter_config(tmp_path / "x.pth")
        with pytest.raises(ValueError, match=words):
            read_adapter_file(tmp_path / "x.pth")
    odd = {**sd, "layers.0.attention.wq_bias": torch.zeros(DIM - 3)}
    with pytest.raises(ValueError, match="whole heads"):
        original_to_ours(odd, 2)
    unpaired = {k: v for k, v in original_adapter(base[1], **CHAT_65B).items() if k != "layers.0.attention.wq_scale"}
    torch.save({"model": unpaired}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="in pairs"):
        read_adapter_config(tmp_path / "x.pth")


# -- writing ----------------------------------------------------------------------------------

def test_convert_round_trips_through_the_original_formats(base, tmp_path):
    sd = original_adapter(base[1], **CHAT_65B)
    torch.save({"model": sd}, tmp_path / "chat65b.pth")
    assert cli.main(["convert", str(tmp_path / "chat65b.pth"), "--out", str(tmp_path / "ours.safetensors")]) == 0
    assert cli.main(["convert", str(tmp_path / "ours.safetensors"), "--to", "original",
                     "--out", str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert sorted(back) == sorted(sd)  # wq and wk biases permuted to Meta's order and back
    for name, t in sd.items():
        assert torch.equal(back[name], t), name
    with torch.no_grad():
        settings = read_adapter_config(tmp_path / "ours.safetensors")
        _close(ours(base, settings, tmp_path / "ours.safetensors")(TOKENS), _reference(base, sd))

    # An adapter trained here (V1, and V2 with every norm) is written as the original loads it.
    settings = dict(adapter_len=P, adapter_layers=2)
    model = LLaMAAdapter.from_meta(base[0], dtype=torch.float64, attention_backend="eager", **settings)
    with torch.no_grad():
        for layer in model.adapter_layers():
            layer.gate.normal_()
    model.save_adapter(tmp_path / "v1.safetensors")
    assert cli.main(["convert", str(tmp_path / "v1.safetensors"), "--to", "original",
                     "--out", str(tmp_path / "v1.pth")]) == 0
    v1 = torch.load(tmp_path / "v1.pth", weights_only=True)
    assert "model" not in v1 and v1["layers.2.attention.gate"].shape == (1, HEADS, 1, 1)
    with torch.no_grad():
        _close(model.eval()(TOKENS), _reference(base, v1))
    v2 = LLaMAAdapter.from_meta(base[0], dtype=torch.float64, attention_backend="eager", norm_tuning=True,
                                bias_tuning=("wq", "wk", "wo"), scale_tuning="input", **settings)
    with torch.no_grad():
        for _, p in v2.adapter_parameters():
            p.copy_((p + 0.2 * torch.randn(p.shape)).float())  # what a float32 file holds
    v2.save_adapter(tmp_path / "v2.safetensors")
    write_original_adapter(tmp_path / "v2.pth", read_adapter_file(tmp_path / "v2.safetensors"),
                           read_adapter_config(tmp_path / "v2.safetensors"))
    with torch.no_grad():
        _close(v2.eval()(TOKENS), _reference(base, torch.load(tmp_path / "v2.pth", weights_only=True)["model"]))


@pytest.mark.parametrize("settings, words", [
    (dict(gate_activation="identity"), "without tanh"),
    (dict(scalar_gate=True), "one per layer"),
    (dict(prefix_projection="litgpt"), "litgpt"),
    (dict(bias_tuning=("wq",), scale_tuning="output"), "outputs"),
    (dict(bias_tuning=("output",), scale_tuning="none"), "LM head"),
])
def test_what_the_original_cannot_hold_is_refused(base, tmp_path, settings, words):
    model = LLaMAAdapter.from_meta(base[0], adapter_len=P, adapter_layers=2, **settings)
    model.save_adapter(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=words):
        convert_adapter(str(tmp_path / "a.safetensors"), str(tmp_path / "a.pth"), to="original")
    assert not (tmp_path / "a.pth").exists()


def test_writing_needs_prompts_and_gates(tmp_path):
    with pytest.raises(ValueError, match="one prompt and one gate per adapted layer"):
        write_original_adapter(tmp_path / "a.pth", {"norm.weight": torch.ones(DIM)}, {"norm_tuning": True})
    assert not (tmp_path / "a.pth").exists()


def test_finetune_resume_and_generate_take_an_original_v2_file(base_dir, data_file, tmp_path, capsys):
    """A V2 adapter as the original 65B release holds it: generate answers as with the same
    adapter in this package's file, and --resume starts the same new run from either."""
    from llama_adapter_fast.training.bases import load_base
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import finetune

    v2 = load_base(base_dir, adapter_len=P, adapter_layers=1, bias_tuning=("wq", "wk", "wv", "wo", "w1", "w2", "w3"),
                   scale_tuning="input", norm_tuning=True)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in v2.adapter_parameters():
            p.add_(0.3 * torch.randn(p.shape)) if name != "norm.weight" else None  # the release's final norm: base's
    v2.save_adapter(tmp_path / "ours.safetensors")
    assert cli.main(["convert", str(tmp_path / "ours.safetensors"), "--to", "original",
                     "--out", str(tmp_path / "chat.pth")]) == 0
    original = torch.load(tmp_path / "chat.pth", weights_only=True)["model"]
    del original["norm.weight"]
    torch.save({"model": original}, tmp_path / "chat.pth")
    capsys.readouterr()
    answers = []
    for adapter in ("ours.safetensors", "chat.pth"):
        assert cli.main(["generate", "--base", str(base_dir), "--adapter", str(tmp_path / adapter), "--prompt",
                         "Give the opposite of the word.", "--input", "wet", "--max-new-tokens", "4",
                         "--device", "cpu"]) == 0
        answers.append(capsys.readouterr().out.splitlines()[-1])
    assert answers[0] == answers[1]

    def run(out, resume):
        return finetune(TrainConfig(base=str(base_dir), data=str(data_file), out_dir=str(tmp_path / out),
                                    resume=str(tmp_path / resume), attention_backend="sdpa", max_seq_len=80,
                                    batch_size=2, max_steps=2, lr=1e-2, progress=False, plot=False, device="cpu"))

    from_original, from_ours = run("from-original", "chat.pth"), run("from-ours", "ours.safetensors")
    assert from_original.first_loss == from_ours.first_loss
    settings = read_adapter_config(tmp_path / "from-original" / "adapter.safetensors")
    assert settings["scale_tuning"] == "input" and settings["norm_tuning"] and len(settings["bias_tuning"]) == 7


@pytest.mark.parametrize("gates_everywhere", [False, True])
def test_a_split_that_its_gates_contradict_is_refused(base, tmp_path, capsys, gates_everywhere):
    """Given --adapter-len and --adapter-layers that re-split the prompt vectors over other
    layers than those holding the trained gates used to be accepted, dropping trained gates.
    Where every layer keeps a gate (V1) an adapted layer's may still be zero, so there the
    trained gates only bound the adapted layers from below."""
    sd = original_adapter(base[1], layers=2, gates_everywhere=gates_everywhere)  # 2 x P prompt vectors
    sd["adapter_query.weight"] = _random((2 * 2 * P, DIM))  # 4P vectors: 2 layers of 2P, or 1 layer of 4P
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="--adapter-layers 1 disagrees with .*its gates are (trained )?in its top 2"):
        read_adapter_config(tmp_path / "a.pth", adapter_layers=1)
    if not gates_everywhere:  # 4 layers of P: more layers than hold gates
        with pytest.raises(ValueError, match=f"--adapter-len {P} disagrees with .*its gates are in its top 2 layers"):
            read_adapter_config(tmp_path / "a.pth", adapter_len=P)
    assert read_adapter_config(tmp_path / "a.pth")["adapter_layers"] == 2
    assert read_adapter_config(tmp_path / "a.pth", adapter_layers=2, adapter_len=2 * P)["adapter_len"] == 2 * P
    assert cli.main(["convert", str(tmp_path / "a.pth"), "--out", str(tmp_path / "ours.safetensors"),
                     "--adapter-layers", "1"]) == 2
    assert "disagrees" in capsys.readouterr().err and not (tmp_path / "ours.safetensors").exists()
