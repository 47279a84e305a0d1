"""Fine-tuning: the first step at zero gates, exact resume, data parallelism (two gloo
processes), and the command line end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_adapter_fast import cli
from llama_adapter_fast.data import SYNTHETIC_FILES
from llama_adapter_fast.model import LLaMAAdapter, ModelArgs, read_adapter_config
from llama_adapter_fast.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from llama_adapter_fast.train import CHECKPOINT, TrainConfig, finetune, load_base, lr_at, step_indices

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a Hugging Face folder, with the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=Tokenizer().n_words, multiple_of=16,
                                   max_seq_len=96, adapter_layers=0))
    model.save_hf(folder)
    shutil.copy(DEFAULT_TOKENIZER, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = SYNTHETIC_FILES["train"].read_text().splitlines()[:24]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(base_dir, data_file, out, **kw) -> TrainConfig:
    args = dict(base=str(base_dir), data=str(data_file), out_dir=str(out), adapter_len=3, adapter_layers=2,
                attention_backend="sdpa", max_seq_len=80, batch_size=2, grad_accum=2, max_steps=6, lr=2e-2,
                warmup_steps=2, progress=False, plot=False, device="cpu", save_every=2, seed=0)
    args.update(kw)
    return TrainConfig(**args)


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def test_first_step_at_zero_gates_moves_only_the_gates(base_dir, data_file, tmp_path):
    model = load_base(base_dir, adapter_len=3, adapter_layers=2, attention_backend="sdpa")
    # The prompts' gradient is exactly zero while the gates are zero: the prefix branch is
    # multiplied by tanh(0) = 0. The gates' gradient is not.
    tokens = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    model(tokens).float().logsumexp(-1).mean().backward()
    for attn in model.adapter_layers():
        assert torch.count_nonzero(attn.adapter_prompt.grad) == 0
        assert attn.gate.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)

    before = {n: t.clone() for n, t in model.adapter_state_dict().items()}
    finetune(config(base_dir, data_file, tmp_path, max_steps=1, weight_decay=0.0), model=model)
    after = model.adapter_state_dict()
    for name, t in before.items():
        if name.endswith("adapter_prompt"):
            assert torch.equal(after[name], t), name
        else:
            assert not torch.equal(after[name], t), name


def test_resume_after_an_interruption_is_bit_identical(base_dir, data_file, tmp_path):
    finetune(config(base_dir, data_file, tmp_path / "straight"))

    def crash(event, n):  # the process dies in the middle of step 5 (after the checkpoint of step 4)
        if event == "micro_step" and n == 1 and crash.steps == 4:
            raise RuntimeError("simulated crash")
        if event == "step":
            crash.steps = n

    crash.steps = 0
    interrupted = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(config(base_dir, data_file, interrupted), callback=crash)
    assert torch.load(interrupted / CHECKPOINT, weights_only=True)["step"] == 4
    with pytest.raises(ValueError, match="already holds a training checkpoint"):
        finetune(config(base_dir, data_file, interrupted))
    result = finetune(config(base_dir, data_file, interrupted, resume=True))
    assert result.steps == 6
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(interrupted)
    for name, t in straight.items():
        assert torch.equal(resumed[name], t), name
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["loss"] for r in rows(interrupted)] == [r["loss"] for r in rows(tmp_path / "straight")]
    assert [r["step"] for r in rows(interrupted)] == [1, 2, 3, 4, 5, 6]


def test_keyboard_interrupt_saves_the_last_completed_step(base_dir, data_file, tmp_path):
    def stop(event, n):
        if event == "micro_step" and stop.steps == 3:
            raise KeyboardInterrupt
        if event == "step":
            stop.steps = n

    stop.steps = 0
    with pytest.raises(KeyboardInterrupt):
        finetune(config(base_dir, data_file, tmp_path / "a", save_every=100), callback=stop)
    assert torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["step"] == 3
    # A training checkpoint holds the adapter too, and the settings to build a model for it.
    settings = read_adapter_config(tmp_path / "a" / CHECKPOINT)
    assert settings == {"adapter_len": 3, "adapter_layers": 2, "scalar_gate": False, "gate_activation": "tanh"}
    load_base(base_dir, **settings).load_adapter(tmp_path / "a" / CHECKPOINT)
    finetune(config(base_dir, data_file, tmp_path / "a", save_every=100, resume=True))
    finetune(config(base_dir, data_file, tmp_path / "b"))
    for name, t in adapter_tensors(tmp_path / "b").items():
        assert torch.equal(adapter_tensors(tmp_path / "a")[name], t), name


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llama_adapter_fast.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def one_process(base_dir, data_file, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one")
    finetune(config(base_dir, data_file, out, batch_size=4, grad_accum=1, max_steps=4))
    return adapter_tensors(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(base_dir, data_file, one_process, tmp_path, strategy):
    """The same global batch of 4 records per step, split over two CPU processes."""
    proc = torchrun(["finetune", "--base", str(base_dir), "--data", str(data_file), "--out", str(tmp_path / "two"),
                     "--adapter-len", "3", "--adapter-layers", "2", "--attention-backend", "sdpa",
                     "--max-seq-len", "80", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4",
                     "--lr", "2e-2", "--warmup-steps", "2", "--device", "cpu", "--no-progress", "--no-plot",
                     "--strategy", strategy])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter:") == 1  # only the first process reports
    two = adapter_tensors(tmp_path / "two")
    for name, t in one_process.items():
        assert torch.allclose(two[name], t, rtol=1e-5, atol=1e-6), (name, (two[name] - t).abs().max())
    assert not torch.equal(one_process["layers.1.attention.gate"], torch.zeros(2))


def test_cli_end_to_end(tmp_path, capsys):
    base = tmp_path / "base"
    assert cli.main(["pretrain", "--data", str(SYNTHETIC_FILES["pretrain"]), "--out", str(base), "--dim", "32",
                     "--n-layers", "2", "--n-heads", "2", "--max-steps", "3", "--batch-size", "4",
                     "--block-len", "32", "--device", "cpu"]) == 0
    assert (base / "config.json").is_file() and (base / "tokenizer.model").is_file()
    out = tmp_path / "adapter"
    data = tmp_path / "data.json"  # a JSON list this time
    data.write_text(json.dumps([json.loads(x) for x in SYNTHETIC_FILES["train"].read_text().splitlines()[:8]]))
    assert cli.main(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
                     "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--max-seq-len", "80",
                     "--device", "cpu", "--print-every", "1"]) == 0
    for name in ("adapter.safetensors", "checkpoint.pt", "metrics.jsonl", "loss.png", "train_config.json"):
        assert (out / name).is_file(), name
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(m) for m in metrics)
    printed = capsys.readouterr().out
    assert "loss plot:" in printed and "adapter:" in printed
    # Resume past the end continues to a larger step count.
    assert cli.main(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
                     "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2", "--max-seq-len", "80",
                     "--device", "cpu", "--resume", "--no-progress"]) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["lr"] > 0  # the schedule of the longer run, not the finished one
    capsys.readouterr()

    answers = tmp_path / "answers.jsonl"
    assert cli.main(["generate", "--base", str(base), "--adapter", str(out / "adapter.safetensors"),
                     "--instructions", str(SYNTHETIC_FILES["heldout"]), "--max-new-tokens", "4",
                     "--output", str(answers), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### Response:") == len(SYNTHETIC_FILES["heldout"].read_text().splitlines())
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert all("response" in r for r in rows)
    assert cli.main(["generate", "--base", str(base), "--prompt", "What colour is this?", "--input", "sky",
                     "--max-new-tokens", "3", "--temperature", "0.7", "--device", "cpu"]) == 0
    assert "### Input: sky" in capsys.readouterr().out


def test_cli_bad_data_files_give_clear_errors(base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": 7, "output": "d"}\n')
    code = cli.main(["finetune", "--base", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "o"),
                     "--max-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{bad}: record 1 (line 2): 'input' must be a string" in err
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(base_dir, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer.model"))
    code = cli.main(["generate", "--base", str(no_tokenizer), "--prompt", "hi", "--device", "cpu"])
    assert code == 2 and "has no tokenizer.model" in capsys.readouterr().err
    code = cli.main(["finetune", "--base", str(tmp_path), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 2 and "neither config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--base", str(base_dir)])  # --data is required


def test_schedule_and_data_order():
    lrs = [lr_at(s, 100, 10, 1e-2, 1e-4) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[-1] > 1e-4
    # Consecutive steps walk through one permutation per epoch, whatever the batch boundaries.
    seen = [i for s in range(5) for i in step_indices(s, 10, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]
