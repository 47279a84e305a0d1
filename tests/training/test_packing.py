"""Padding-free fine-tuning: records packed into one sequence give what each gives alone,
and a packed training step is the padded step without the padding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.bundled import TOKENIZER as BUNDLED_TOKENIZER
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.ops.testing import expect_launches, rel_error
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.data import IGNORE_INDEX, collate_packed, pack_records
from llama_adapter_fast.training.recipes import finetune
from llama_adapter_fast.training.tokenizer import Tokenizer


def test_pack_records():
    lengths = [5, 9, 1, 12, 7, 3, 30]
    packs = pack_records(lengths, budget=12)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))
    for pack in packs:
        assert sum(lengths[i] for i in pack) <= 12 or len(pack) == 1  # a record over the budget packs alone
    assert packs == pack_records(lengths, budget=12)  # deterministic
    assert len(packs) == 5  # 30 | 12 | 9 3 | 7 5 | 1
    with pytest.raises(ValueError, match="budget"):
        pack_records(lengths, budget=0)


def test_collate_packed_layout():
    items = [{"tokens": torch.tensor([5, 6, 7]), "labels": torch.tensor([6, 7, 2])},
             {"tokens": torch.tensor([8]), "labels": torch.tensor([IGNORE_INDEX])},
             {"tokens": torch.tensor([9, 10]), "labels": torch.tensor([10, 2])}]
    batch = collate_packed(items)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["labels"].tolist() == [[6, 7, 2, IGNORE_INDEX, 10, 2]]
    assert batch["positions"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 4, 6] and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == 3


def tiny_model(backend: str, seed: int = 0) -> LLaMAAdapter:
    torch.manual_seed(seed)
    model = LLaMAAdapter(ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                                   max_seq_len=64, adapter_len=5, adapter_layers=2, attention_backend=backend))
    with torch.no_grad():
        for layer in model.adapter_layers():
            layer.gate.uniform_(-1, 1)  # non-zero gates: the prefix part counts
    return model


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_packed_forward_and_gradients_equal_each_record_alone(backend):
    """Layers with and without adapter: logits of a packed batch and the prompts' and
    gates' gradients equal those of the records run one by one (padding-free)."""
    model = tiny_model(backend)
    g = torch.Generator().manual_seed(1)
    lengths = [7, 1, 20, 16, 3]
    records = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    batch = collate_packed([{"tokens": r, "labels": r} for r in records])
    kernels = ("forward", "backward_prefix", "backward") if backend == "triton" else ()
    # The forward kernel runs in all three layers (the plain one's packed attention is the
    # fused kernel with no prefix); nothing below the adapted layers needs a gradient.
    with expect_launches(*kernels, times={"forward": 3, "backward_prefix": 2, "backward": 2}):
        packed = model(batch["tokens"], positions=batch["positions"], cu_seqlens=batch["cu_seqlens"],
                       max_seqlen=batch["max_seqlen"])
        packed.square().mean().backward()
    packed_grads = [p.grad.clone() for _, p in model.adapter_parameters()]
    model.zero_grad()
    alone = torch.cat([model(r[None]) for r in records], dim=1)
    alone.square().mean().backward()
    assert packed.shape == alone.shape == (1, sum(lengths), 97)
    assert rel_error(packed, alone) < 1e-5
    for grad, (name, p) in zip(packed_grads, model.adapter_parameters(), strict=True):
        assert rel_error(grad, p.grad) < 1e-4, name


def test_packed_positions_default_to_restarting():
    model = tiny_model("sdpa")
    batch = collate_packed([{"tokens": torch.tensor([3, 4, 5]), "labels": torch.tensor([4, 5, 6])},
                            {"tokens": torch.tensor([7, 8]), "labels": torch.tensor([8, 9])}])
    given = model(batch["tokens"], positions=batch["positions"], cu_seqlens=batch["cu_seqlens"], max_seqlen=3)
    derived = model(batch["tokens"], cu_seqlens=batch["cu_seqlens"], max_seqlen=3)
    assert torch.equal(given, derived)
    with pytest.raises(ValueError, match="max_seqlen"):
        model(batch["tokens"], cu_seqlens=batch["cu_seqlens"])
    with pytest.raises(ValueError, match="shape \\(1, L\\)"):
        model(batch["tokens"].expand(2, -1), cu_seqlens=batch["cu_seqlens"], max_seqlen=3)


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=Tokenizer().n_words, multiple_of=16,
                           max_seq_len=96, adapter_layers=0)).save_hf(folder)
    shutil.copy(BUNDLED_TOKENIZER, folder / "tokenizer.model")
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    data.write_text("\n".join(SYNTHETIC_FILES["train"].read_text().splitlines()[:24]) + "\n")
    return folder, data


def run(base_and_data, out, **kw):
    folder, data = base_and_data
    args = dict(base=str(folder), data=str(data), out_dir=str(out), adapter_len=3, adapter_layers=2,
                attention_backend="sdpa", max_seq_len=80, batch_size=4, grad_accum=2, max_steps=3, lr=2e-2,
                warmup_steps=1, progress=False, plot=False, device="cpu", seed=0)
    args.update(kw)
    result = finetune(TrainConfig(**args))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result, metrics


def test_packed_steps_are_the_padded_steps_without_padding(base_and_data, tmp_path):
    """The same records per step, the same loss (the mean over the response tokens of the
    global batch), the same updates; only the computed padding differs."""
    padded, padded_rows = run(base_and_data, tmp_path / "padded", pack=False)
    packed, packed_rows = run(base_and_data, tmp_path / "packed", pack=True, pack_tokens=120)
    for a, b in zip(padded_rows, packed_rows, strict=True):
        assert a["tokens"] == b["tokens"]  # real tokens, the same records
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert b["padding"] == 0.0 < a["padding"]
    assert packed.final_loss == pytest.approx(padded.final_loss, rel=1e-4)


def test_cli_pack_options(base_and_data, tmp_path):
    from llama_adapter_fast import cli

    folder, data = base_and_data
    common = ["finetune", "--base", str(folder), "--data", str(data), "--adapter-len", "3", "--max-seq-len", "80",
              "--batch-size", "6", "--max-steps", "1", "--attention-backend", "sdpa", "--device", "cpu",
              "--no-progress", "--no-plot"]
    assert cli.main([*common, "--out", str(tmp_path / "a"), "--no-pack"]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "b"), "--pack-tokens", "100"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["padding"] == 0.0
    padded_rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert padded_rows[0]["padding"] > 0.0 and padded_rows[0]["tokens"] == rows[0]["tokens"]
