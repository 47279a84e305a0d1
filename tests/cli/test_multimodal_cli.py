"""The multi-modal adapter from the command line: fine-tuning on records with pictures,
generation with them, resume, the demo in miniature, and every error a user meets on the
way (missing, corrupt, oversized or misplaced pictures, a missing or another encoder)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from llama_adapter_fast import cli
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.models.multimodal import MultiModalLLaMAAdapter, load_image_adapter
from llama_adapter_fast.models.vision import ImageEncoder
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.recipes import finetune

from support.manual import manual_text
from support.tiny_clip import tiny_encoder, tiny_tower, write_picture

ROOT = Path(__file__).resolve().parents[2]


def test_finetune_then_generate_with_pictures(tmp_path, base_dir, encoder_dir, capsys):
    """finetune with an image encoder on records with and without pictures, then the adapter
    file reloads beside the same encoder (and its answers), and not beside another one."""
    for i in range(3):
        write_picture(tmp_path / "data" / f"p{i}.png", i)
    rows = [{"instruction": "What colour are the shapes?", "output": c, "image": f"p{i}.png"}
            for i, c in enumerate(["red", "blue", "green"])] + [{"instruction": "Say yes.", "output": "yes"}]
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = TrainConfig(base=str(base_dir), data=str(data), out_dir=str(out), image_encoder=str(encoder_dir),
                      image_layers=[2, 3], adapter_len=2, adapter_layers=2, attention_backend="sdpa", max_seq_len=80,
                      batch_size=2, max_steps=3, lr=5e-2, warmup_steps=1, progress=False, plot=False, device="cpu")
    result = finetune(cfg)
    adapter = result.adapter_path
    assert sorted(p.name for p in (out / "image_features").iterdir())  # one folder per encoder fingerprint

    from llama_adapter_fast.cli.generate import load_for_generation

    mm = load_for_generation(str(base_dir), str(adapter))  # the encoder folder recorded in the file
    assert isinstance(mm, MultiModalLLaMAAdapter) and mm.image_encoder.layers == [2, 3]
    assert any(p.abs().sum() > 0 for n, p in mm.adapter_parameters() if n.endswith(".gate"))
    code = cli.main(["generate", "--base", str(base_dir), "--adapter", str(adapter), "--prompt",
                     "What colour are the shapes?", "--image", str(tmp_path / "data" / "p1.png"),
                     "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 0
    assert "\nimage: " in capsys.readouterr().out
    # Records of --instructions carry their pictures, relative to that file.
    code = cli.main(["generate", "--base", str(base_dir), "--adapter", str(adapter), "--instructions", str(data),
                     "--max-new-tokens", "2", "--device", "cpu"])
    assert code == 0 and capsys.readouterr().out.count("\nimage: ") == 3
    questions = tmp_path / "data" / "questions.jsonl"
    questions.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "image": "gone.png"}) + "\n")
    code = cli.main(["generate", "--base", str(base_dir), "--adapter", str(adapter), "--instructions", str(questions),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and f"{questions}: record 1: image {tmp_path / 'data' / 'gone.png'} does not exist" in err, err

    # Another encoder (other weights): a clear error, from the API and from the command line.
    other = tmp_path / "other_encoder"
    tiny_encoder(seed=7).save_pretrained(other)
    llama = LLaMAAdapter(ModelArgs(**{**vars(mm.args)}))
    with pytest.raises(ValueError, match="trained with another image encoder"):
        load_image_adapter(llama, adapter, image_encoder=str(other))
    code = cli.main(["generate", "--base", str(base_dir), "--adapter", str(adapter), "--image-encoder", str(other),
                     "--prompt", "What colour?", "--image", str(tmp_path / "data" / "p1.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "another image encoder" in err and "weights_sha256" in err


def test_resume_refuses_other_pictures_or_encoder_weights(tmp_path, base_dir, encoder_dir):
    """The features a run trained on depend on the image files and on the encoder's weights
    (not only its folder's name): a resumed run must see the same, or stop."""
    for i in range(2):
        write_picture(tmp_path / "data" / f"p{i}.png", i)
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "What colour?", "output": c, "image": f"p{i}.png"}) + "\n"
                            for i, c in enumerate(["red", "blue"])))
    cfg = TrainConfig(base=str(base_dir), data=str(data), out_dir=str(tmp_path / "run"), image_encoder=str(encoder_dir),
                      adapter_len=2, adapter_layers=2, attention_backend="sdpa", max_seq_len=80, batch_size=2,
                      max_steps=1, progress=False, plot=False, device="cpu")
    finetune(cfg)
    again = dataclasses.replace(cfg, max_steps=2, resume=True)
    write_picture(tmp_path / "data" / "p1.png", 5)  # another picture under the same name
    with pytest.raises(ValueError, match="--image-encoder or the pictures"):
        finetune(again)
    write_picture(tmp_path / "data" / "p1.png", 1)  # the picture back: the run resumes
    assert finetune(again).steps == 2
    tiny_encoder(seed=7).save_pretrained(encoder_dir)  # other weights in the same folder
    with pytest.raises(ValueError, match="--image-encoder or the pictures"):
        finetune(dataclasses.replace(cfg, max_steps=3, resume=True))


def test_the_manuals_picture_error_holds(tmp_path, base_dir, encoder_dir, capsys, monkeypatch):
    readme = manual_text()
    example = next(line.strip() for line in readme.splitlines()
                   if line.startswith("    llama-adapter-fast finetune: error:") and ": image " in line)
    monkeypatch.chdir(tmp_path)
    Path("cat.png").write_text("meow")
    Path("bad.jsonl").write_text(json.dumps({"instruction": "q", "output": "a", "image": "cat.png"}) + "\n")
    code = cli.main(["finetune", "--base", str(base_dir), "--data", "bad.jsonl", "--out", "o",
                     "--image-encoder", str(encoder_dir), "--device", "cpu", "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == example


def test_cli_errors_for_pictures(tmp_path, base_dir, encoder_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a", "image": "missing.png"}) + "\n")
    code = cli.main(["finetune", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--image-encoder", str(encoder_dir), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}: record 0: image {tmp_path / 'missing.png'} does not exist" in err, err
    # Pictures without an image encoder, or for a text adapter.
    code = cli.main(["finetune", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "record 0 has an image" in err and "--image-encoder" in err
    code = cli.main(["generate", "--base", str(base_dir), "--prompt", "q", "--image", str(data), "--device", "cpu"])
    assert code == 2 and "multi-modal adapter" in capsys.readouterr().err


def test_demo_runs_end_to_end_in_miniature(tmp_path, monkeypatch, capsys):
    """`demo-mm` with a few steps of each stage: every stage runs and the report is printed
    (the real figures come from `make demo-mm`)."""
    monkeypatch.chdir(tmp_path)  # no base left by an earlier run
    threads = torch.get_num_threads()
    try:
        code = cli.main(["demo-mm", "--out", "out", "--pretrain-steps", "2", "--encoder-steps", "2",
                         "--finetune-steps", "2", "--show", "3", "--no-progress", "--device", "cpu",
                         "--attention-backend", "sdpa"])
    finally:
        torch.set_num_threads(threads)  # the demo runs on one thread
    out = capsys.readouterr().out
    assert code == 0
    assert "pretrained on plain sentences for 2 steps" in out and "for 2 steps, then frozen" in out
    for task in ("all questions", "colour", "count", "position"):
        assert task in out
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "loss.png").is_file()
    assert (tmp_path / "out" / "encoder" / "preprocessor_config.json").is_file()


@pytest.fixture
def trained(tmp_path, base_dir, encoder_dir) -> Path:
    """A multi-modal adapter fine-tuned for two steps next to its encoder."""
    for i in range(2):
        write_picture(tmp_path / "data" / f"p{i}.png", i)
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "What colour?", "output": c, "image": f"p{i}.png"}) + "\n"
                            for i, c in enumerate(["red", "blue"])))
    cfg = TrainConfig(base=str(base_dir), data=str(data), out_dir=str(tmp_path / "run"), image_encoder=str(encoder_dir),
                      adapter_len=2, adapter_layers=2, attention_backend="sdpa", max_seq_len=80, batch_size=2,
                      max_steps=2, progress=False, plot=False, device="cpu")
    return finetune(cfg).adapter_path


def generate_args(base_dir, adapter, *extra) -> list[str]:
    return ["generate", "--base", str(base_dir), "--adapter", str(adapter), "--max-new-tokens", "2", "--device",
            "cpu", *extra]


def test_pictures_over_pillows_limit_are_one_line_errors(tmp_path, base_dir, encoder_dir, trained, capsys,
                                                         monkeypatch):
    """A decompression bomb (here: a 32 x 32 picture under a limit of 100 pixels) is one
    error line naming the picture and exit code 2, from generate --image, from a record of
    --instructions and from finetune's data; a large picture under the limit warns once."""
    from PIL import Image

    big = write_picture(tmp_path / "data" / "big.png", 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    code = cli.main(generate_args(base_dir, trained, "--prompt", "What colour?", "--image", str(big)))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"image {big} is over Pillow's limit of 100 pixels" in err, err
    questions = tmp_path / "data" / "questions.jsonl"
    questions.write_text(json.dumps({"instruction": "What colour?", "image": "big.png"}) + "\n")
    code = cli.main(generate_args(base_dir, trained, "--instructions", str(questions)))
    err = capsys.readouterr().err
    assert code == 2 and f"{questions}: record 0: image {big} is over Pillow's limit" in err, err
    data = tmp_path / "data" / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "q", "output": "a", "image": "big.png"}) + "\n")
    code = cli.main(["finetune", "--base", str(base_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                     "--image-encoder", str(encoder_dir), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}: record 0: image {big} is over Pillow's limit" in err, err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)  # 1,024 pixels: over the limit, under twice it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(generate_args(base_dir, trained, "--prompt", "What colour?", "--image", str(big)))
    large = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert code == 0 and len(large) == 1 and str(big) in str(large[0].message)


def test_a_multimodal_adapter_answers_text_without_its_encoder(tmp_path, base_dir, encoder_dir, trained, capsys):
    """Records without pictures run as the text adapter: they need no encoder folder."""
    import shutil

    code = cli.main(generate_args(base_dir, trained, "--prompt", "Say yes."))
    with_encoder = capsys.readouterr().out
    shutil.rmtree(encoder_dir)
    code = cli.main(generate_args(base_dir, trained, "--prompt", "Say yes."))
    captured = capsys.readouterr()
    assert code == 0 and "answers as the text adapter" in captured.err
    assert captured.out == with_encoder  # a record without a picture is exactly the text adapter
    code = cli.main(generate_args(base_dir, trained, "--prompt", "What colour?", "--image",
                                  str(tmp_path / "data" / "p0.png")))
    err = capsys.readouterr().err
    assert code == 2 and f"the image encoder it recorded, '{encoder_dir}', is not a folder here" in err, err


def test_picture_and_encoder_messages_say_what_is_wrong(tmp_path, base_dir, encoder_dir, trained, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    code = cli.main(generate_args(base_dir, trained, "--prompt", "What colour?", "--image", "imgs/"))
    err = capsys.readouterr().err
    assert code == 2 and "image imgs is a folder, not a picture" in err, err
    code = cli.main(generate_args(base_dir, trained, "--prompt", "q", "--image-encoder", "nowhere"))
    err = capsys.readouterr().err
    assert code == 2 and "--image-encoder nowhere is not a folder" in err and "pass --image-encoder" not in err, err
    shallow = tmp_path / "shallow_encoder"
    ImageEncoder(tiny_tower(num_hidden_layers=2)).save_pretrained(shallow)  # the adapter reads layers 1 and 3 of 3
    code = cli.main(generate_args(base_dir, trained, "--prompt", "q", "--image-encoder", str(shallow)))
    err = capsys.readouterr().err
    assert code == 2 and "trained with another image encoder" in err and "has 2 layers" in err, err


def test_output_keeps_each_records_own_picture_value(tmp_path, base_dir, trained, monkeypatch):
    """--output writes every record back as it was, "image" included (not the path it was
    read from), from any working directory."""
    questions = tmp_path / "data" / "questions.jsonl"
    rows = [{"instruction": "What colour?", "image": "p1.png"}, {"instruction": "Say yes."}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path / "data")
    out = tmp_path / "answers.jsonl"
    assert cli.main(generate_args(base_dir, trained, "--instructions", str(questions), "--output", str(out))) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in written if "image" in r] == ["p1.png"]
    assert [r["instruction"] for r in written] == ["What colour?", "Say yes."]
