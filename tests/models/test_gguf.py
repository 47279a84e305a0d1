"""GGUF files that cannot be a base are refused with the argument and the reason named,
before anything is converted (the conversion of a real file: tests/models/test_real_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from llama_adapter_fast import cli  # noqa: E402
from llama_adapter_fast.models.formats.gguf import check_gguf, convert_gguf, gguf_base_folder, is_gguf  # noqa: E402


def write_gguf(path, arch: str, tensor: np.ndarray) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_files_that_are_no_llama_gguf_are_refused(tmp_path, capsys):
    text = tmp_path / "model.gguf"
    text.write_text("not a model")
    gpt2, ints, cut = tmp_path / "gpt2.gguf", tmp_path / "ints.gguf", tmp_path / "cut.gguf"
    write_gguf(gpt2, "gpt2", np.zeros((4, 4), dtype=np.float32))
    write_gguf(ints, "llama", np.zeros((4, 4), dtype=np.int32))
    cut.write_bytes(gpt2.read_bytes()[:40])
    assert is_gguf(gpt2) and not is_gguf(text) and not is_gguf(tmp_path)
    cases = {tmp_path / "missing.gguf": "is not a file", text: "is not a GGUF file",
             gpt2: "holds a 'gpt2' model; this package reads the architectures llama",
             ints: "quantization type I32, which the installed gguf package cannot dequantize",
             cut: "unreadable GGUF file"}
    for path, message in cases.items():
        with pytest.raises(ValueError, match=f"base: {path}.*{message}"):
            check_gguf(path)
    with pytest.raises(ValueError, match="holds a 'gpt2' model"):
        gguf_base_folder(gpt2)
    with pytest.raises(ValueError, match="gguf: .*holds a 'gpt2' model"):
        convert_gguf(gpt2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert cli.main(["finetune", "--base", str(ints), "--data", str(text), "--out", str(tmp_path / "run")]) == 2
    assert "quantization type I32" in capsys.readouterr().err
    assert cli.main(["convert", str(text), "--out", str(tmp_path / "out")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert cli.main(["convert", str(gpt2), "--out", str(tmp_path / "taken")]) == 2
    assert "exists: choose a new folder" in capsys.readouterr().err


def test_another_transformers_or_gguf_converts_again(tmp_path, monkeypatch):
    """The conversion's output depends on the readers (transformers 5.0 wrote another vocabulary
    size and other stop ids for SmolLM2's file than 5.25), so the cache is keyed by their
    versions as well as by the file: a cache made by another version is never read."""
    from llama_adapter_fast.models.formats import gguf as formats_gguf

    model = tmp_path / "model.gguf"
    write_gguf(model, "llama", np.zeros((4, 4), dtype=np.float32))
    monkeypatch.setenv("LLAMA_ADAPTER_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(formats_gguf, "check_gguf", lambda path, what="base": str(path))
    converted = []

    def convert(path, out, dtype="float32"):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        converted.append(out)
        return out

    monkeypatch.setattr(formats_gguf, "convert_gguf", convert)
    first = formats_gguf.gguf_base_folder(model)
    assert formats_gguf.gguf_base_folder(model) == first and converted == [first]
    monkeypatch.setattr(formats_gguf, "_reader_versions", lambda: "transformers 0.0, gguf 0.0")
    second = formats_gguf.gguf_base_folder(model)
    assert second != first and converted == [first, second]
