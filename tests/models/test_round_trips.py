"""The conversion table as a matrix: an adapter of each kind the formats hold, written by this
package, converted into every format that holds it and back again, and read by the package
at each stop: the same logits everywhere, and back home the same tensors, settings and
record (template, tokenizer) as the file it started from.

The formats' own readers of what the package writes are tested beside each format: PEFT's
`PeftModel.from_pretrained` (test_adapter_formats.py), litgpt's `GPT.load_state_dict`
(test_litgpt_formats.py), and the original code's forward (test_original_formats.py).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from llama_adapter_fast import cli
from llama_adapter_fast.models.formats.native import read_adapter_config, read_adapter_metadata
from llama_adapter_fast.ops.testing import rel_error
from llama_adapter_fast.training.bases import load_base

ALL_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")

# Each kind of adapter: the model settings, and the formats that hold it without loss (the
# conversion table of docs/formats.md). "exact": the way back gives the same tensors and
# settings; otherwise the same model in the target's own terms (a tanh gate as its value).
KINDS = {
    "peft: one identity gate per layer": (dict(gate_activation="identity", scalar_gate=True),
                                          {"peft": "exact"}),
    "peft: one tanh gate per layer": (dict(scalar_gate=True), {"peft": "same model"}),
    "peft and original: tanh gates per head, equal heads": ({}, {"peft": "same model", "original": "exact"}),
    "original V1: tanh gates per head": ({}, {"original": "exact"}),
    "original V2 (65B layout)": (dict(bias_tuning=("wq", "wk", "wv", "wo", "w1", "w2", "w3"), scale_tuning="input",
                                      norm_tuning=True), {"original": "exact"}),
    "litgpt adapter": (dict(gate_activation="identity", prefix_projection="litgpt"), {"litgpt": "exact"}),
    "litgpt adapter_v2": (dict(gate_activation="identity", prefix_projection="litgpt", bias_tuning=ALL_LINEARS,
                               scale_tuning="output", norm_tuning=True), {"litgpt": "exact"}),
    "this package only: tanh per head, output scales": (dict(bias_tuning=("wq", "wo"), scale_tuning="output"), {}),
}
SUFFIX = {"peft": "", "litgpt": ".pth", "original": ".pth"}
RECORD = {"template": "alpaca", "tokenizer_sha256": "0" * 64, "base": "tiny"}


def tokens() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def read_model(base_dir, path):
    model = load_base(base_dir, attention_backend="sdpa", **read_adapter_config(path))
    model.load_adapter(path)
    return model.eval()


def logits_of(base_dir, path) -> torch.Tensor:
    with torch.no_grad():
        return read_model(base_dir, path)(tokens())


@pytest.fixture(params=list(KINDS))
def adapter(request, base_dir, tmp_path):
    """(kind, this package's file of a random adapter of that kind, its logits)."""
    settings, _ = KINDS[request.param]
    torch.manual_seed(sorted(KINDS).index(request.param))
    model = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=2, **settings)
    with torch.no_grad():
        for name, p in model.adapter_parameters():
            if name.endswith(".gate"):
                equal = "equal heads" in request.param
                p.copy_(torch.empty(() if equal else p.shape).uniform_(-1.5, 1.5).expand(p.shape))
            else:
                p.add_(0.3 * torch.randn(p.shape))  # zero-initialized biases, unit scales and norms move
        expected = model.eval()(tokens())
    path = tmp_path / "ours.safetensors"
    model.save_adapter(path, metadata=RECORD)
    return request.param, path, expected


def test_every_format_that_holds_an_adapter_gives_it_back(adapter, base_dir, tmp_path):
    kind, ours, expected = adapter
    assert rel_error(logits_of(base_dir, ours), expected) < 1e-6
    targets = KINDS[kind][1]

    # This package's own format, converted into itself: nothing changes, the record stays.
    assert cli.main(["convert", str(ours), "--out", str(tmp_path / "copy.safetensors")]) == 0
    assert_same_file(ours, tmp_path / "copy.safetensors")

    for target in ("peft", "litgpt", "original"):
        out = tmp_path / f"as-{target}{SUFFIX[target]}"
        args = ["convert", str(ours), "--out", str(out), "--to", target]
        if target not in targets:  # refused, and nothing written
            assert cli.main(args) == 2 and not out.exists(), target
            continue
        assert cli.main([*args, *(["--base-model", str(base_dir)] if target == "peft" else [])]) == 0
        assert rel_error(logits_of(base_dir, out), expected) < 1e-5, target
        back = tmp_path / f"back-from-{target}.safetensors"
        assert cli.main(["convert", str(out), "--out", str(back)]) == 0
        assert rel_error(logits_of(base_dir, back), expected) < 1e-5, target
        if targets[target] == "exact":
            assert_same_file(ours, back, record=False)  # the target format holds no record


def assert_same_file(a, b, record: bool = True) -> None:
    assert read_adapter_config(b) == read_adapter_config(a)
    if record:
        assert {k: read_adapter_metadata(b).get(k) for k in RECORD} == RECORD
    tensors_a, tensors_b = load_file(str(a)), load_file(str(b))
    assert sorted(tensors_b) == sorted(tensors_a)
    for name, t in tensors_a.items():
        assert torch.equal(tensors_b[name], t), name


def test_a_command_reads_its_adapter_once(base_dir, data_file, tmp_path, monkeypatch, capsys):
    """convert, generate, finetune --resume and load_adapter read an adapter file once (they
    used to read it up to five times: to classify it, for its settings, its record, its
    tensors)."""
    from llama_adapter_fast.models.formats.original import write_original_adapter

    model = load_base(base_dir, attention_backend="sdpa", adapter_len=3, adapter_layers=2)
    with torch.no_grad():
        for layer in model.adapter_layers():
            layer.gate.uniform_(-1.5, 1.5)
    pth = tmp_path / "original.pth"
    write_original_adapter(pth, model.adapter_state_dict(), model.args.adapter_config())
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        reads.append(str(f))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    for label, action in (
        ("load_adapter", lambda: model.load_adapter(pth)),
        ("convert", lambda: cli.main(["convert", str(pth), "--out", str(tmp_path / "ours.safetensors")])),
        ("generate", lambda: cli.main(["generate", "--base", str(base_dir), "--adapter", str(pth), "--prompt", "hi",
                                       "--max-new-tokens", "1", "--device", "cpu"])),
        ("finetune --resume", lambda: cli.main(["finetune", "--base", str(base_dir), "--data", str(data_file),
                                                "--out", str(tmp_path / "run"), "--resume", str(pth),
                                                "--max-steps", "1", "--batch-size", "2", "--device", "cpu",
                                                "--no-progress", "--no-plot"])),
    ):
        reads.clear()
        assert action() in (None, 0), label
        assert reads.count(str(pth)) == 1, (label, reads)
    capsys.readouterr()
