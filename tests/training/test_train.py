"""Fine-tuning: the first step at zero gates, exact resume, data parallelism (two gloo
processes), and the command line end to end."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_adapter_fast import cli
from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.models.formats.native import read_adapter_config
from llama_adapter_fast.training.bases import load_base
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.data import format_prompt, load_instructions
from llama_adapter_fast.training.recipes import finetune
from llama_adapter_fast.training.run_folder import CHECKPOINT
from llama_adapter_fast.training.schedule import lr_at, step_indices

ROOT = Path(__file__).resolve().parents[2]


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
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
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


def test_two_gloo_processes_on_an_nf4_base_match_one_process(base_dir, data_file, tmp_path):
    """DDP over a quantized base (each process quantizes its own replica, the same way); FSDP,
    which cannot shard 4-bit weights, is refused naming --quantize."""
    pytest.importorskip("bitsandbytes")
    finetune(config(base_dir, data_file, tmp_path / "one", batch_size=4, grad_accum=1, max_steps=3, quantize="nf4"))
    run = ["finetune", "--base", str(base_dir), "--data", str(data_file), "--adapter-len", "3", "--adapter-layers",
           "2", "--attention-backend", "sdpa", "--max-seq-len", "80", "--batch-size", "2", "--grad-accum", "1",
           "--max-steps", "3", "--lr", "2e-2", "--warmup-steps", "2", "--device", "cpu", "--no-progress", "--no-plot",
           "--quantize", "nf4"]
    proc = torchrun([*run, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = adapter_tensors(tmp_path / "one"), adapter_tensors(tmp_path / "two")
    for name, t in one.items():
        assert torch.allclose(two[name], t, rtol=1e-5, atol=1e-6), (name, (two[name] - t).abs().max())
    proc = torchrun([*run, "--out", str(tmp_path / "sharded"), "--strategy", "fsdp"])
    assert proc.returncode != 0 and "--quantize cannot be sharded by --strategy fsdp" in proc.stderr
    assert not (tmp_path / "sharded").exists()


def test_a_checkpoint_without_fsdp_does_not_resume_under_fsdp(base_dir, data_file, tmp_path):
    """Its optimizer state is keyed by parameter number, which FSDP's loader cannot map: the
    one-line error naming the way that works, not a KeyError from the loader."""
    out = tmp_path / "one"
    finetune(config(base_dir, data_file, out, batch_size=4, grad_accum=1, max_steps=1))
    proc = torchrun(["finetune", "--base", str(base_dir), "--data", str(data_file), "--out", str(out),
                     "--adapter-len", "3", "--adapter-layers", "2", "--attention-backend", "sdpa",
                     "--max-seq-len", "80", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
                     "--lr", "2e-2", "--warmup-steps", "2", "--device", "cpu", "--no-progress", "--no-plot",
                     "--strategy", "fsdp", "--resume"])
    assert proc.returncode != 0  # (torchrun reports its failed workers with a traceback of its own)
    assert "finetune: error: resume:" in proc.stderr, proc.stderr[-3000:]
    assert "was written without FSDP" in proc.stderr and "--strategy ddp" in proc.stderr


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
    assert printed.count("\nanswer: ") == len(SYNTHETIC_FILES["heldout"].read_text().splitlines())
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert all("response" in r for r in rows)
    assert cli.main(["generate", "--base", str(base), "--prompt", "What colour is this?", "--input", "sky",
                     "--max-new-tokens", "3", "--temperature", "0.7", "--device", "cpu"]) == 0
    assert "\ninput: sky\n" in capsys.readouterr().out


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
    assert code == 2 and "is neither a GGUF file nor a folder with config.json" in capsys.readouterr().err
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


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_honours_safe_changes_and_names_them(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    finetune(config(base_dir, data_file, out, max_steps=4))
    capsys.readouterr()
    finetune(config(base_dir, data_file, out, max_steps=6, lr=1e-2, weight_decay=0.1, save_every=3, resume=True))
    printed = capsys.readouterr().out
    assert "--lr 0.02 -> 0.01" in printed and "--max-steps 4 -> 6" in printed and "--weight-decay" in printed
    assert "--save-every 2 -> 3" in printed
    rows = rows_of(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The new peak rate drives the schedule from the resumed step on (6 steps, 2 of warmup).
    assert rows[4]["lr"] == pytest.approx(lr_at(4, 6, 2, 1e-2, 0.0))
    assert rows[5]["lr"] == pytest.approx(lr_at(5, 6, 2, 1e-2, 0.0))
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["step"] == 6 and state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


@pytest.mark.parametrize("change, option", [
    ({"seed": 1}, "--seed"),
    ({"gate_activation": "identity"}, "--gate-activation"),
    ({"max_seq_len": 70}, "--max-seq-len"),
    ({"adapter_len": 4}, "--adapter-len"),
    ({"scalar_gate": True}, "--scalar-gate"),
    ({"batch_size": 4, "grad_accum": 2}, "global batch"),
    ("other data", "--data"),
    ("other tokenizer", "--tokenizer"),
])
def test_resume_refuses_settings_that_cannot_change(base_dir, data_file, tmp_path, change, option):
    out = tmp_path / "run"
    finetune(config(base_dir, data_file, out, max_steps=2))
    if change == "other data":
        other = tmp_path / "other.jsonl"
        other.write_text("\n".join(data_file.read_text().splitlines()[1:]) + "\n")
        change = {"data": str(other)}
    elif change == "other tokenizer":
        import sentencepiece as spm

        text = [line for r in load_instructions(data_file)
                for line in (format_prompt(r["instruction"], r["input"]) + " " + r["output"]).splitlines() if line]
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=200,
                                       model_type="bpe", minloglevel=2)
        other = tmp_path / "tokenizer.model"
        other.write_bytes(model.getvalue())
        change = {"tokenizer": str(other)}
    before = (out / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=option):
        finetune(config(base_dir, data_file, out, max_steps=4, resume=True, **change))
    assert (out / CHECKPOINT).read_bytes() == before


def test_resume_accepts_a_moved_data_file(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    finetune(config(base_dir, data_file, out, max_steps=2))
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data_file.read_bytes())
    capsys.readouterr()
    finetune(config(base_dir, moved, out, max_steps=3, resume=True))
    assert f"--data {data_file} -> {moved}" in capsys.readouterr().out


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="needs SIGINT")
def test_ctrl_c_between_the_update_and_the_step_counter_applies_the_update_once(base_dir, data_file, tmp_path):
    """Ctrl-C lands after the optimizer has updated the weights of step 4 but before the
    step counter says so: the checkpoint must hold step 4 with step 4's weights (and the
    resumed run must not apply that update twice)."""
    finetune(config(base_dir, data_file, tmp_path / "straight", save_every=100))

    def ctrl_c(event, n):
        if event == "optimizer_step" and n == 4:
            # To this thread: a process-wide kill may land in any of the process's threads
            # (the suite leaves several), and the test would then depend on their timing.
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "interrupted"
    # Ctrl-C as a terminal delivers it to Python's default handler, whatever handler an
    # earlier test's libraries left installed in this process (the trainer calls that one).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune(config(base_dir, data_file, out, save_every=100), callback=ctrl_c)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 4
    assert [r["step"] for r in rows_of(out)] == [1, 2, 3, 4]
    finetune(config(base_dir, data_file, out, save_every=100, resume=True))
    for name, t in adapter_tensors(tmp_path / "straight").items():
        assert torch.equal(adapter_tensors(out)[name], t), name
    assert [r["loss"] for r in rows_of(out)] == [r["loss"] for r in rows_of(tmp_path / "straight")]


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(base_dir, data_file, tmp_path):
    model = load_base(base_dir, adapter_len=3, adapter_layers=2, attention_backend="sdpa")

    def diverge(event, n):  # after the checkpoint of step 2, the weights blow up
        if event == "step" and n == 2:
            with torch.no_grad():
                model.adapter_layers()[0].adapter_prompt.fill_(float("nan"))

    with pytest.raises(ValueError, match=r"step 3: the loss is nan.*step 2"):
        finetune(config(base_dir, data_file, tmp_path, save_every=2), model=model, callback=diverge)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["step"] == 2
    saved = adapter_tensors(tmp_path)  # the adapter of step 2, not a NaN one
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, t in state["trainable"].items():
        assert torch.equal(saved[name], t), name
    assert [r["step"] for r in rows_of(tmp_path)] == [1, 2]


def test_a_run_without_any_response_token_stops(base_dir, data_file, tmp_path):
    with pytest.raises(ValueError, match="no record keeps a response token.*--max-seq-len 8"):
        finetune(config(base_dir, data_file, tmp_path, max_seq_len=8))
    assert not (tmp_path / "adapter.safetensors").exists() and not (tmp_path / CHECKPOINT).exists()


def test_resume_with_another_template_names_the_template(tmp_path):
    """Another --template makes the records tokenize differently, which used to be blamed on
    --tokenizer."""
    import dataclasses

    from llama_adapter_fast.training.run_folder import check_resume_settings

    cfg = TrainConfig(out_dir=str(tmp_path), template="alpaca")
    adapter = {"adapter_len": 2, "adapter_layers": 2, "gate_activation": "tanh", "scalar_gate": False}
    state = {"config": dataclasses.asdict(cfg), "global_batch": 2, "adapter": adapter, "fingerprints": {"tokens": "a"}}
    with pytest.raises(ValueError, match="resume: --template was 'alpaca' .* this run has 'chat'"):
        check_resume_settings(state, tmp_path / CHECKPOINT, dataclasses.replace(cfg, template="chat"), 2, adapter,
                              {"tokens": "b"})
