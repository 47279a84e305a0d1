"""tokenizer.json bases: the `tokenizers` library's byte-level BPE with its folder's special
tokens and stop ids, checked against transformers' own tokenizer of the same folder, and
a fine-tuning run and generation from a base that ships no tokenizer.model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llama_adapter_fast import cli
from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.generation import generate
from llama_adapter_fast.training.bases import load_tokenizer
from llama_adapter_fast.training.tokenizer import HFTokenizer, Tokenizer, open_tokenizer

from support.hf_tokenizer_files import write_tokenizer

tokenizers = pytest.importorskip("tokenizers")

@pytest.fixture(scope="module", params=[False, True], ids=["no-start-token", "start-token"])
def hf_folder(request, tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok"), start_token=request.param)


TEXTS = ["What colour is the sky?", "  spaces, tabs\tand\nnew lines ", "ünïcödé and emoji 🦙", "42 + 58 = 100", ""]


def test_ids_and_text_are_transformers_own(hf_folder):
    """encode(bos=True) is transformers' tokenizer of the folder with its special tokens,
    bos=False without; decode drops the special tokens as skip_special_tokens does."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    ours = HFTokenizer(hf_folder)
    for text in TEXTS:
        assert ours.encode(text, bos=True) == theirs(text)["input_ids"], text
        assert ours.encode(text, bos=False) == theirs(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text, bos=True, eos=True)
        assert ids[-1] == theirs.convert_tokens_to_ids("<|im_end|>")
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert ours.n_words == len(theirs)
    assert ours.pad_id == theirs.pad_token_id and ours.eos_id == theirs.eos_token_id
    assert ours.chat_template == theirs.chat_template


def test_special_ids_come_from_the_folder(hf_folder):
    tok = open_tokenizer(hf_folder)
    assert isinstance(tok, HFTokenizer)
    fast = tok.fast
    end, text_end = fast.token_to_id("<|im_end|>"), fast.token_to_id("<|endoftext|>")
    assert tok.eos_id == end and tok.stop_ids == (end, text_end) and tok.pad_id == text_end
    start = tok.encode("", bos=True)
    assert start == ([fast.token_to_id("<|begin_of_text|>")] if start else [])
    assert tok.bos_id == (start[0] if start else -1)
    assert open_tokenizer(hf_folder / "tokenizer.json").stop_ids == tok.stop_ids


def test_defaults_without_configs_and_sentencepiece_first(tmp_path, hf_folder):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(hf_folder / "tokenizer.json", bare)
    tok = HFTokenizer(bare)
    assert tok.eos_id == -1 and tok.stop_ids == () and tok.pad_id == 0 and tok.chat_template is None
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    tok = HFTokenizer(bare)
    assert tok.eos_id == 5 and tok.stop_ids == (5,) and tok.pad_id == 5
    # A folder with both (LLaMA-2's) reads the sentencepiece model.
    shutil.copy(Tokenizer().path, bare / "tokenizer.model")
    assert isinstance(open_tokenizer(bare), Tokenizer) and open_tokenizer(bare).stop_ids == (Tokenizer().eos_id,)


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.model"),
    (lambda f: (f / "tokenizer.json").write_text("{not json"), "is not a Hugging Face tokenizer.json"),
    (lambda f: (f / "tokenizer_config.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda f: (f / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"})),
     "eos_token '<|nope|>' is not in tokenizer.json"),
])
def test_bad_tokenizer_folders_are_value_errors(tmp_path, hf_folder, change, message):
    folder = tmp_path / "t"
    shutil.copytree(hf_folder, folder)
    change(folder)
    with pytest.raises(ValueError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_tokenizer(None, str(folder))


def test_generation_stops_on_any_stop_id():
    from llama_adapter_fast.models import LLaMAAdapter, ModelArgs

    torch.manual_seed(0)
    model = LLaMAAdapter(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64,
                                   adapter_layers=0)).eval()
    free = generate(model, [[1, 2, 3]], max_new_tokens=12)[0]
    k = next(k for k in range(2, len(free)) if free[k] not in free[:k])  # a token new at step k
    unused = next(t for t in range(64) if t not in free)
    assert generate(model, [[1, 2, 3]], max_new_tokens=12, eos_id=[unused, free[k]])[0] == free[:k]
    assert generate(model, [[1, 2, 3]], max_new_tokens=12, eos_id=(free[k], free[0]))[0] == []
    assert generate(model, [[1, 2, 3]], max_new_tokens=12, eos_id=free[k])[0] == free[:k]
    with pytest.raises(TypeError, match="eos_id"):
        generate(model, [[1, 2, 3]], max_new_tokens=2, eos_id="2")


def test_finetune_and_generate_from_a_base_with_only_tokenizer_json(base_dir, tmp_path, capsys):
    """The base's own byte-level tokenizer frames the data, and generation stops on its stop ids."""
    base = tmp_path / "base"
    shutil.copytree(base_dir, base, ignore=shutil.ignore_patterns("tokenizer.model"))
    write_tokenizer(base, start_token=True)
    tok = load_tokenizer(None, str(base))
    assert isinstance(tok, HFTokenizer) and tok.n_words <= 1024  # the base's vocabulary
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(SYNTHETIC_FILES["train"].read_text().splitlines()[:8]) + "\n")
    out = tmp_path / "run"
    assert cli.main(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
                     "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "64", "--device", "cpu",
                     "--no-progress"]) == 0
    assert cli.main(["generate", "--base", str(base), "--adapter", str(out / "adapter.safetensors"),
                     "--prompt", "What colour is the sky?", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "\nanswer: " in capsys.readouterr().out
