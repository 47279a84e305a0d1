"""User mistakes on the command line end with one `error:` line naming the file or the
option, exit code 2, and no traceback."""

from __future__ import annotations

import pytest
import torch
from test_train import base_dir, data_file  # noqa: F401  (module fixtures: a tiny base and its data)

from llama_adapter_fast import cli


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


def finetune_args(base, data, out, *extra: str) -> list[str]:
    return ["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
            "--adapter-layers", "2", "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "80",
            "--device", "cpu", "--no-progress", "--no-plot", *extra]


@pytest.mark.skipif(torch.cuda.is_available(), reason="bfloat16 runs through the kernels on a GPU")
def test_bf16_through_triton_on_the_cpu_stops_before_training(base_dir, data_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--attention-backend", "triton",
                                       "--precision", "bf16"), "--precision bf16", "--attention-backend triton")
    assert not (out / "checkpoint.pt").exists()
    expect_error(capsys, finetune_args(base_dir, data_file, out, "--attention-backend", "triton",
                                       "--dtype", "bfloat16"), "--dtype bfloat16", "--attention-backend triton")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cpu",
                          "--attention-backend", "triton", "--dtype", "bfloat16"], "--dtype bfloat16")


def test_unknown_or_missing_devices(base_dir, data_file, tmp_path, capsys):  # noqa: F811
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--device", "bogus"), "--device 'bogus'")
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "bogus"], "--device")
    if not torch.cuda.is_available():
        expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cuda"],
                     "--device cuda: not available")
        expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", "--device", "cuda:1"),
                     "--device cuda:1: not available")


def test_data_records_and_paths(base_dir, tmp_path, capsys):  # noqa: F811
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
def test_finetune_options_out_of_range(base_dir, data_file, tmp_path, capsys, options, fragment):  # noqa: F811
    expect_error(capsys, finetune_args(base_dir, data_file, tmp_path / "o", *options), fragment)
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("options, fragment", [
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
])
def test_generate_options_out_of_range(base_dir, capsys, options, fragment):  # noqa: F811
    expect_error(capsys, ["generate", "--base", str(base_dir), "--prompt", "hi", "--device", "cpu", *options],
                 fragment)
