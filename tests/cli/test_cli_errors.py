"""User mistakes on the command line end with one `error:` line naming the file or the
option, exit code 2, and no traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from llama_adapter_fast import cli

from support.manual import manual_text


def expect_error(capsys, argv: list[str], *fragments: str) -> str:
    """Run the command line in this process (an exception escaping main fails the test) and
    check its one error line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def forbid_loading(monkeypatch, why: str) -> None:
    """Make loading a base fail the test: what is checked must be checked before it."""
    from llama_adapter_fast.training import bases, recipes

    def no_loading(*args, **kwargs):
        raise AssertionError(why)

    monkeypatch.setattr(bases, "load_base", no_loading)
    monkeypatch.setattr(recipes, "load_base", no_loading)


def finetune_args(base, data, out, *extra: str) -> list[str]:
    return ["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
            "--adapter-layers", "2", "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "80",
            "--device", "cpu", "--no-progress", "--no-plot", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="bfloat16 runs through the kernels on a GPU")
@pytest.mark.interpreter
def test_bf16_through_triton_on_the_cpu_stops_before_training(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--attention-backend", "triton",
                                       "--precision", "bf16"), "--precision bf16", "--attention-backend triton")
    assert not (out / "checkpoint.pt").exists()
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--attention-backend", "triton",
                                       "--dtype", "bfloat16"), "--dtype bfloat16", "--attention-backend triton")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cpu",
                          "--attention-backend", "triton", "--dtype", "bfloat16"], "--dtype bfloat16")


def test_triton_where_it_cannot_run_stops_before_the_base_loads(base_dir, data_file, tmp_path, capsys,
                                                                 monkeypatch):
    """Without a GPU and without Triton's interpreter, --attention-backend triton is refused
    before minutes go into loading the base, by finetune and by generate."""
    from llama_adapter_fast.ops import custom_ops

    monkeypatch.setattr(custom_ops, "can_run_on", lambda device: False)
    forbid_loading(monkeypatch, "the base was loaded before the backend was checked")
    out = tmp_path / "out"
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--attention-backend", "triton"),
                 "--attention-backend triton cannot run on cpu", "TRITON_INTERPRET=1")
    assert not out.exists()
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cpu",
                          "--attention-backend", "triton"], "--attention-backend triton cannot run on cpu")


def test_unknown_or_missing_devices(base_dir, data_file, tmp_path, capsys):
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--device", "bogus"), "--device 'bogus'")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "bogus"], "--device")
    if not torch.cuda.is_available():
        expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cuda"],
                     "--device cuda: not available")
        expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--device", "cuda:1"),
                     "--device cuda:1: not available")


def test_data_records_and_paths(base_dir, tmp_path, capsys):
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "x\\ud800y", "output": "b"}\n')
    expect_error(capsys, finetune_args(base_dir, surrogate, tmp_path / "o"),
                 f"{surrogate}: record 1 (line 2)", "'instruction'", "surrogate")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--instructions", str(surrogate), "--device", "cpu"],
                 f"{surrogate}: record 1 (line 2)")
    folder = tmp_path / "a_folder"
    folder.mkdir()
    expect_error(capsys, finetune_args(base_dir, folder, tmp_path / "o"), f"{folder} is a folder")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--instructions", str(folder), "--device", "cpu"],
                 f"{folder} is a folder")


@pytest.mark.parametrize("options, fragment", [
    (["--lr", "1e-3", "--min-lr", "1e-2"], "--min-lr"),
    (["--blr", "1e-3", "--min-lr", "1"], "--min-lr"),  # above the default lr = blr * batch / 256
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--clip-grad", "nan"], "--clip-grad"),
    (["--lr", "inf"], "--lr"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--epochs", "inf", "--max-steps", "0"], "--max-steps"),
    (["--save-every", "0"], "--save-every"),
])
def test_finetune_options_out_of_range(base_dir, data_file, tmp_path, capsys, options, fragment):
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", *options), fragment)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("options, fragment", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
])
def test_generate_options_out_of_range(base_dir, capsys, options, fragment):
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cpu", *options],
                 fragment)


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--finetune-steps", "0"], "argument --finetune-steps: must be at least 1"),
    (["demo", "--pretrain-steps", "-3"], "argument --pretrain-steps: must be at least 1"),
    (["demo-mm", "--finetune-steps", "0"], "argument --finetune-steps: must be at least 1"),
    (["demo-mm", "--encoder-steps", "-1"], "argument --encoder-steps: must be at least 0"),
])
def test_demo_step_counts_out_of_range(capsys, argv, fragment):
    """A step count of 0 is refused, not replaced by the default."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 2
    assert fragment in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(base_dir, data_file, tmp_path_factory):
    """An out folder of a finished 2-step run (adapter and checkpoint)."""
    out = tmp_path_factory.mktemp("trained")
    assert cli.main(finetune_args(base_dir, data_file, out)) == 0
    return out


@pytest.mark.parametrize("change, option", [(["--adapter-len", "3"], "--adapter-len"),
                                            (["--scalar-gate"], "--scalar-gate")])
def test_resume_with_a_changed_adapter_shape(base_dir, data_file, trained, capsys, change, option):
    expect_error(capsys, finetune_args(base_dir, data_file, trained, "--max-steps", "3", "--resume", *change),
                 f"resume: {option} was")


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt", "not a checkpoint", "folder"])
def test_resume_from_a_damaged_checkpoint(base_dir, data_file, trained, tmp_path, capsys, damage):
    checkpoint = tmp_path / "checkpoint.pt"
    good = (trained / "checkpoint.pt").read_bytes()
    if damage == "folder":
        checkpoint.mkdir()
    else:
        checkpoint.write_bytes({"empty": b"", "truncated": good[: len(good) // 2],
                                "corrupt": good[:100] + bytes(range(256)) * 4 + good[1124:],
                                "not a checkpoint": b""}[damage])
        if damage == "not a checkpoint":
            torch.save({"step": 3}, checkpoint)
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--resume", str(checkpoint)),
                 f"resume: {checkpoint}")


def test_a_missing_resume_checkpoint_stops_before_loading(base_dir, data_file, tmp_path, capsys,
                                                           monkeypatch):
    forbid_loading(monkeypatch, "the base was loaded before the checkpoint was looked for")
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--resume", str(missing)),
                 f"resume: checkpoint {missing} does not exist")


def test_resume_of_a_finished_run(base_dir, data_file, trained, tmp_path, capsys):
    """The trained run is at step 2: resuming it for 2 steps trains nothing and says so; for
    fewer steps than it has done is an error."""
    out = tmp_path / "o"
    shutil.copytree(trained, out)
    capsys.readouterr()
    assert cli.main(finetune_args(base_dir, data_file, out, "--max-steps", "2", "--resume")) == 0
    assert "nothing to train: the checkpoint is at step 2" in capsys.readouterr().out
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--max-steps", "1", "--resume"),
                 "is at step 2, past the 1 steps of this run")


def test_resume_keeps_the_options_it_is_not_given(base_dir, data_file, tmp_path, capsys):
    """A resumed run given only --resume and more steps continues with the settings its
    checkpoint was trained with (a changed --seed would be refused, another --lr would
    change the run, a changed --print-every used to be reported as honoured); the summary
    counts the steps this process ran."""
    out = tmp_path / "o"
    assert cli.main(finetune_args(base_dir, data_file, out, "--lr", "0.02", "--seed", "3", "--print-every", "1")) == 0
    capsys.readouterr()
    assert cli.main(["finetune", "--base", str(base_dir), "--data", str(data_file), "--out", str(out), "--resume",
                     "--max-steps", "3", "--device", "cpu", "--no-progress", "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "resume: changed settings, honoured from step 2 on: --max-steps 2 -> 3" in printed
    assert "--print-every" not in printed and "--seed" not in printed
    assert "step    3/3" in printed, printed  # --print-every 1 kept
    assert "in 1 step, resumed at step 2," in printed
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["config"]
    assert (saved["lr"], saved["seed"], saved["adapter_len"], saved["batch_size"]) == (0.02, 3, 2, 2)


def test_resume_over_a_torn_metrics_row(base_dir, data_file, trained, tmp_path, capsys):
    """A run killed while appending a metrics row leaves it torn: resume drops it (its step
    runs again); a bad row before the last is an error naming the file."""
    out = tmp_path / "o"
    shutil.copytree(trained, out)
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 3, "epo')
    assert cli.main(finetune_args(base_dir, data_file, out, "--max-steps", "3", "--resume")) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text('{"step": 1, "lo\n' + good)
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--max-steps", "4", "--resume"),
                 f"{metrics}: line 1 is not a metrics row")


def test_ctrl_c_ends_with_the_resume_line_and_no_traceback(base_dir, data_file, tmp_path, capsys,
                                                           monkeypatch):
    from llama_adapter_fast.training.trainer import Trainer

    micro_batches = Trainer._micro_batches

    def interrupted_in_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt
        return micro_batches(self)

    monkeypatch.setattr(Trainer, "_micro_batches", interrupted_in_step_2)
    out = tmp_path / "o"
    assert cli.main(finetune_args(base_dir, data_file, out, "--max-steps", "3")) == 130
    captured = capsys.readouterr()
    assert f"interrupted: checkpoint of step 1 in {out / 'checkpoint.pt'}; continue with --resume" in captured.out
    assert captured.err.strip() == "llama-adapter-fast finetune: interrupted"


def test_a_second_run_on_the_same_out_folder_stops(base_dir, data_file, tmp_path, capsys):
    from llama_adapter_fast.training.run_folder import LOCK, out_folder_lock

    out = tmp_path / "o"
    with out_folder_lock(out):  # a run holds the folder
        expect_error(capsys, finetune_args(base_dir, data_file, out), f"--out {out} is in use by another run",
                     f"pid {os.getpid()}")
        assert not (out / "metrics.jsonl").exists()
    # A lock file left by a run that died (its lock went with its process) does not block.
    (out / LOCK).write_text("pid 999999999 on some-host\n")
    assert cli.main(finetune_args(base_dir, data_file, out)) == 0
    assert (out / "adapter.safetensors").is_file() and not (out / LOCK).exists()


def test_an_unusable_out_folder_is_refused_before_loading(base_dir, data_file, tmp_path, capsys,
                                                          monkeypatch):
    forbid_loading(monkeypatch, "the base was loaded before the out folder was checked")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    expect_error(capsys, finetune_args(base_dir, data_file, a_file / "out"), f"--out {a_file / 'out'}")
    expect_error(capsys, finetune_args(base_dir, data_file, base_dir), "--out", "is the base folder")


def instructions_file(path, long_at: int | None = None, n: int = 3):
    records = [{"instruction": f"Give the opposite of the word. {i}", "input": "wet", "output": "dry"}
               for i in range(n)]
    if long_at is not None:
        records[long_at]["input"] = " ".join(["red green blue"] * 60)  # far beyond the base's 96 positions
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_generate_skips_an_over_long_record_and_keeps_the_others(base_dir, tmp_path, capsys):
    data, answers = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    records = instructions_file(data, long_at=1)
    assert cli.main(["generate", "--base", str(base_dir), "--instructions", str(data), "--output", str(answers),
                     "--max-new-tokens", "3", "--batch-size", "2", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"{data}: record 1: its prompt of" in captured.err and "skipped" in captured.err
    assert "Traceback" not in captured.err and "error:" not in captured.err
    assert captured.out.count("\nanswer: ") == 2
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [r["instruction"] for r in records]
    assert isinstance(rows[0]["response"], str) and isinstance(rows[2]["response"], str)
    assert rows[1]["response"] is None and "leaves no room" in rows[1]["skipped"]
    # One prompt given on the command line that cannot fit is an error, not a skip.
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", records[1]["instruction"], "--input",
                          records[1]["input"], "--device", "cpu"], "--prompt", "leaves no room")


def test_generate_writes_each_answer_as_it_comes(base_dir, tmp_path, capsys, monkeypatch):
    import llama_adapter_fast.generation as generation

    data, answers = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    instructions_file(data, n=5)
    batches = []
    real = generation.generate

    def dies_in_the_second_batch(*args, **kwargs):
        batches.append(1)
        if len(batches) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", dies_in_the_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.main(["generate", "--base", str(base_dir), "--instructions", str(data), "--output", str(answers),
                  "--max-new-tokens", "2", "--batch-size", "2", "--device", "cpu"])
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["response"], str) for r in rows)  # the first batch is safe


def test_generate_checks_the_output_before_loading(base_dir, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch, "the base was loaded before --output was checked")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for output in (a_file / "answers.jsonl", tmp_path):
        expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--output", str(output),
                              "--device", "cpu"], f"--output {output}")
    # An existing answers file is replaced only with --overwrite, and stays as it was when
    # loading fails; the instructions file is never written over.
    answers = tmp_path / "answers.jsonl"
    answers.write_text("earlier answers\n")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--output", str(answers),
                          "--device", "cpu"], f"--output {answers} exists", "--overwrite")
    with pytest.raises(AssertionError, match="was loaded"):
        cli.main(["generate", "--base", str(base_dir), "--prompt", "hi", "--output", str(answers), "--device", "cpu",
                  "--overwrite"])
    assert answers.read_text() == "earlier answers\n"
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"instruction": "hi"}) + "\n")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--instructions", str(questions), "--output",
                          str(questions), "--overwrite", "--device", "cpu"], "is the --instructions file")
    assert json.loads(questions.read_text()) == {"instruction": "hi"}


def generate_args(base, adapter, *extra: str) -> list[str]:
    return ["generate", "--base", str(base), "--adapter", str(adapter), "--prompt", "Give the opposite of the word.",
            "--input", "wet", "--max-new-tokens", "3", "--device", "cpu", *extra]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("damage", ["missing", "folder", "empty", "truncated", "corrupt"])
def test_damaged_adapter_files(base_dir, trained, tmp_path, capsys, suffix, damage):
    good = trained / "adapter.safetensors"
    if suffix == ".pth":
        from safetensors.torch import load_file

        torch.save(load_file(str(good)), tmp_path / "good.pth")
        good = tmp_path / "good.pth"
    path = tmp_path / f"adapter{suffix}"
    data = good.read_bytes()
    if damage == "folder":
        path.mkdir()
    elif damage != "missing":
        path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                          "corrupt": bytes(range(256)) * 8}[damage])
    expect_error(capsys, generate_args(base_dir, path), str(path))


@pytest.mark.parametrize("config, fragment", [
    ('{"adapter_len": 2, "adapter_layers": 2, "colour": "red"}', "colour"),
    ('{"adapter_len": "2"}', "adapter_len"),
    ('{"scalar_gate": "no"}', "scalar_gate"),
    ('{"gate_activation": "relu"}', "gate_activation"),
    ('{"adapter_len": 2', "adapter_config"),
    ('[2, 2]', "adapter_config"),
    ('{"adapter_len": 2000000}', "adapter_len"),  # metadata against the tensors, before any allocation
    ('{"adapter_layers": 1}', "adapter_layers"),
])
def test_adapter_metadata_is_checked_against_the_tensors(base_dir, trained, tmp_path, capsys, monkeypatch,
                                                         config, fragment):
    from safetensors.torch import load_file, save_file

    forbid_loading(monkeypatch, "the base was loaded (and the adapter allocated) before the metadata was checked")
    path = tmp_path / "adapter.safetensors"
    save_file(load_file(str(trained / "adapter.safetensors")), str(path),
              metadata={"format": "llama_adapter_fast.adapter/1", "adapter_config": config})
    expect_error(capsys, generate_args(base_dir, path), str(path), fragment)


def original_adapter(trained, path, zero_gates: bool = False):
    """The original LLaMA-Adapter's layout of the trained adapter: every prompt in one
    embedding, a (1, H, 1, 1) gate in every layer (here both layers carry the adapter)."""
    from safetensors.torch import load_file

    ours = load_file(str(trained / "adapter.safetensors"))
    state = {"adapter_query.weight": torch.cat([ours[f"layers.{i}.attention.adapter_prompt"] for i in (0, 1)])}
    for i in (0, 1):
        gate = ours[f"layers.{i}.attention.gate"].reshape(1, -1, 1, 1)
        state[f"layers.{i}.attention.gate"] = torch.zeros_like(gate) if zero_gates else gate
    torch.save(state, path)


def test_generate_loads_an_original_llama_adapter_file(base_dir, trained, tmp_path, capsys):
    assert cli.main(generate_args(base_dir, trained / "adapter.safetensors")) == 0
    ours = capsys.readouterr().out
    original_adapter(trained, tmp_path / "original.pth")
    assert cli.main(generate_args(base_dir, tmp_path / "original.pth")) == 0
    printed = capsys.readouterr().out
    assert "adapter_len 2 and adapter_layers 2" in printed  # said how the file was read
    assert printed.endswith(ours)  # the same answer as from the adapter's own file
    # Gates that are all zero say nothing about the layers: the options do.
    original_adapter(trained, tmp_path / "zero.pth", zero_gates=True)
    expect_error(capsys, generate_args(base_dir, tmp_path / "zero.pth"), "--adapter-len", "--adapter-layers")
    assert cli.main(generate_args(base_dir, tmp_path / "zero.pth", "--adapter-len", "2", "--adapter-layers",
                                  "2")) == 0
    expect_error(capsys, generate_args(base_dir, tmp_path / "zero.pth", "--adapter-len", "3", "--adapter-layers",
                                       "2"), "--adapter-len 3")
    # A file that records its settings must not be contradicted.
    expect_error(capsys, generate_args(base_dir, trained / "adapter.safetensors", "--adapter-len", "3"),
                 "--adapter-len 3")
    # Settings out of range, or that do not divide the prompts, are named.
    for extra, fragment in ((["--adapter-len", "0"], "--adapter-len must be an int >= 1"),
                            (["--adapter-layers", "0"], "--adapter-layers must be an int >= 1"),
                            (["--adapter-layers", "3"], "--adapter-layers 3 does not fit")):
        expect_error(capsys, generate_args(base_dir, tmp_path / "zero.pth", *extra), fragment)
    # A file made for a base with another number of heads (a gate per head).
    state = torch.load(tmp_path / "original.pth")
    for i in (0, 1):
        state[f"layers.{i}.attention.gate"] = torch.full((1, 7, 1, 1), 0.1)
    torch.save(state, tmp_path / "other_heads.pth")
    expect_error(capsys, generate_args(base_dir, tmp_path / "other_heads.pth"),
                 "attention.gate has shape (7,), this model expects (2,)")


def test_runs_that_would_learn_nothing_stop(base_dir, data_file, tmp_path, capsys):
    out = tmp_path / "nan"
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--lr", "1e30", "--max-steps", "4"),
                 "the loss is nan", "no checkpoint was written")
    assert not (out / "adapter.safetensors").exists() and not (out / "checkpoint.pt").exists()
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--lr", "1e38"), "--lr")
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "short", "--max-seq-len", "8"),
                 "no record keeps a response token within --max-seq-len 8")
    assert not (tmp_path / "short" / "adapter.safetensors").exists()


def test_a_bom_and_a_single_pretty_printed_record_load(base_dir, tmp_path, capsys):
    data = tmp_path / "one.json"
    record = {"instruction": "Give the opposite of the word.", "input": "wet", "output": "dry"}
    data.write_bytes(b"\xef\xbb\xbf" + json.dumps(record, indent=2).encode())
    assert cli.main(["generate", "--base", str(base_dir), "--instructions", str(data), "--max-new-tokens", "2",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("\nanswer: ") == 1
    assert cli.main(finetune_args(base_dir, data, tmp_path / "o", "--max-steps", "1")) == 0


def test_the_manuals_error_examples_hold(base_dir, data_file, trained, tmp_path, capsys, monkeypatch):
    readme = manual_text()
    prefix = "    llama-adapter-fast finetune: error:"
    # (the multi-modal adapter's example, about a picture, is checked in test_multimodal.py)
    examples = [line.strip() for line in readme.splitlines() if line.startswith(prefix) and ": image " not in line]
    assert len(examples) == 2
    monkeypatch.chdir(tmp_path)
    lines = data_file.read_text().splitlines()
    records = [{k: json.loads(x)[k] for k in ("instruction", "input", "output")} for x in (lines * 2)[:42]]
    del records[41]["output"]
    Path("data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert expect_error(capsys, finetune_args(base_dir, "data.jsonl", "o")) == examples[0]
    Path("runs").mkdir()
    shutil.copytree(trained, "runs/alpaca")
    assert expect_error(capsys, finetune_args(base_dir, data_file, "runs/alpaca", "--resume", "--seed", "1",
                                              "--max-steps", "3")) == examples[1]


def test_a_closed_stdout_ends_quietly(tmp_path):
    """`generate ... | head`: the reader goes away while answers are being written; the
    command stops with SIGPIPE's status and no traceback."""
    import subprocess
    import sys

    script = ("import sys\n"
              "from llama_adapter_fast import cli\n"
              "def flood(a):\n"
              "    for _ in range(100000):\n"
              "        print('an answer ' * 10, flush=True)\n"
              "    return 0\n"
              "cli.generate.run = flood\n"
              "sys.exit(cli.main(['generate', '--base', 'b', '--prompt', 'hi']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout.read(10) == b"an answer "
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_tokenizer_larger_than_the_models_vocabulary_is_named(data_file, tmp_path, capsys):
    """generate used to end in an IndexError traceback where finetune named the tokenizer."""
    from llama_adapter_fast.bundled import TOKENIZER
    from llama_adapter_fast.models import LLaMAAdapter, ModelArgs

    base = tmp_path / "small-vocab"
    LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=96,
                           adapter_layers=0)).save_hf(base)
    expect_error(capsys, ["generate", "--base", str(base), "--tokenizer", str(TOKENIZER), "--prompt", "hi",
                          "--device", "cpu"], "vocab_size 64", "wrong tokenizer")
    expect_error(capsys, finetune_args(base, data_file, tmp_path / "o", "--tokenizer", str(TOKENIZER)),
                 "vocab_size 64", "wrong tokenizer")


def test_a_tokenizer_much_smaller_than_the_models_vocabulary_is_warned_about(data_file, tmp_path, capsys):
    """Its ids would mean other words to the model: most likely not the base's tokenizer."""
    from llama_adapter_fast.bundled import TOKENIZER
    from llama_adapter_fast.models import LLaMAAdapter, ModelArgs
    from llama_adapter_fast.training.tokenizer import Tokenizer

    n_words = Tokenizer().n_words
    base = tmp_path / "large-vocab"
    LLaMAAdapter(ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=2 * n_words, multiple_of=16, max_seq_len=96,
                           adapter_layers=0)).save_hf(base)
    assert cli.main(["generate", "--base", str(base), "--tokenizer", str(TOKENIZER), "--prompt", "hi",
                     "--max-new-tokens", "1", "--device", "cpu"]) == 0
    warning = f"warning: tokenizer {TOKENIZER} has {n_words} tokens, far fewer than the model's vocab_size"
    assert warning in capsys.readouterr().err
    assert cli.main(finetune_args(base, data_file, tmp_path / "o", "--tokenizer", str(TOKENIZER), "--max-steps",
                                  "1")) == 0
    assert warning in capsys.readouterr().err


def test_a_chat_record_in_the_alpaca_template_is_named_with_its_file(base_dir, tmp_path, capsys):
    """It used to fail with the tokenizer's "Cannot apply chat template to an empty
    conversation", or with no file named."""
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"instruction": "Say yes.", "output": "yes"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    expect_error(capsys, finetune_args(base_dir, data, tmp_path / "o", "--template", "alpaca"),
                 f"{data}: record 1: a chat record", "--template chat")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--instructions", str(data), "--template", "alpaca",
                          "--device", "cpu"], f"{data}: record 1 is a chat record", "--template chat")


def test_records_with_an_empty_answer_are_warned_about(base_dir, tmp_path, capsys):
    """They teach the model to end its turn at once, which is rarely what was meant."""
    data = tmp_path / "data.jsonl"
    records = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe")]
    records[1]["output"] = " "
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(finetune_args(base_dir, data, tmp_path / "o", "--max-steps", "1")) == 0
    assert f"warning: 1 of 3 records of {data} have an empty answer (record 1 first)" in capsys.readouterr().out


def test_a_checkpoint_and_its_conversion_record_what_the_adapter_records(base_dir, trained, tmp_path, capsys):
    """generate --adapter checkpoint.pt used to accept any tokenizer and template, and convert
    into this package's format dropped the record."""
    from llama_adapter_fast.models.formats.native import read_adapter_metadata

    from support.hf_tokenizer_files import write_tokenizer

    adapter = read_adapter_metadata(trained / "adapter.safetensors")
    assert adapter["template"] == "alpaca" and adapter["tokenizer_sha256"]
    checkpoint = trained / "checkpoint.pt"
    converted = tmp_path / "converted.safetensors"
    assert cli.main(["convert", str(checkpoint), "--out", str(converted)]) == 0
    other = write_tokenizer(tmp_path / "other", start_token=False)
    for source in (checkpoint, converted):
        recorded = read_adapter_metadata(source)
        assert {k: recorded[k] for k in ("template", "tokenizer_sha256")} == \
            {k: adapter[k] for k in ("template", "tokenizer_sha256")}
        expect_error(capsys, ["generate", "--base", str(base_dir), "--adapter", str(source), "--tokenizer",
                              str(other), "--prompt", "hi", "--device", "cpu"], "--tokenizer", "is not the tokenizer")
    assert cli.main(["convert", str(checkpoint), "--out", str(tmp_path / "a.pth"), "--to", "original"]) == 0
    assert "cannot hold what training recorded (template alpaca" in capsys.readouterr().err


def test_more_adapter_layers_than_the_base_has_names_the_option(base_dir, data_file, tmp_path, capsys):
    """The message used to name the internal ModelArgs.adapter_layers."""
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--adapter-layers", "3"),
                 "--adapter-layers", "n_layers = 2", "got 3")
