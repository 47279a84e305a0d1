"""Tokenizer, Alpaca data (templates, labels, truncation, padding, errors) and the bundled
synthetic data and tokenizer (reproducible by their scripts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.bundled import TOKENIZER as BUNDLED_TOKENIZER
from llama_adapter_fast.training.data import (
    IGNORE_INDEX,
    PROMPT_DICT,
    DataError,
    InstructionDataset,
    TextDataset,
    collate,
    encode_example,
    format_prompt,
    load_instructions,
)
from llama_adapter_fast.training.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_tokenizer_bos_eos_and_round_trip(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    text = "the opposite of hot is cold.\n### Response: 42 Ünïcode"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.bos_id not in ids[1:-1] and tok.eos_id not in ids[1:-1]
    assert tok.encode(text, bos=False, eos=False) == ids[1:-1]
    assert tok.decode(ids) == text  # byte fallback: any text round-trips
    assert max(ids) < tok.n_words == 1024
    # Words after a newline (where the Alpaca prompt puts instructions and inputs) are whole tokens.
    assert tok.sp.IdToPiece(tok.encode("Input:\nbanana", bos=False)[-1]) == "banana"


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(bad)
    with pytest.raises(TypeError, match="text"):
        Tokenizer().encode(3)


def test_alpaca_templates():
    assert format_prompt("Name a colour.") == PROMPT_DICT["prompt_no_input"].format(instruction="Name a colour.")
    assert format_prompt("Name a colour.").endswith("### Instruction:\nName a colour.\n\n### Response:")
    with_input = format_prompt("What colour is this?", "sky")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nWhat colour is this?\n\n### Input:\nsky\n\n### Response:")


def test_loss_only_on_response_tokens(tok):
    record = {"instruction": "What colour is this?", "input": "sky", "output": "blue"}
    inputs, labels = encode_example(record, tok, max_seq_len=512)
    prompt = tok.encode(format_prompt("What colour is this?", "sky"), bos=True)
    answer = tok.encode("blue", bos=False, eos=True)
    assert inputs == (prompt + answer)[:-1]
    assert labels == [IGNORE_INDEX] * (len(prompt) - 1) + answer  # labels[t] follows inputs[t]
    # Truncation to max_seq_len inputs keeps the shift.
    short_in, short_lab = encode_example(record, tok, max_seq_len=10)
    assert short_in == inputs[:10] and short_lab == labels[:10]
    ds = InstructionDataset([record, record], tok, max_seq_len=10)
    assert ds.num_without_response == 2


def test_collate_pads_on_the_right(tok):
    records = [{"instruction": "What colour is this?", "input": "sky", "output": "blue"},
               {"instruction": "Name the capital city of the country.", "input": "", "output": "paris is the one"}]
    ds = InstructionDataset(records, tok, max_seq_len=512)
    batch = collate([ds[0], ds[1]], pad_id=tok.pad_id)
    n0 = len(ds[0]["tokens"])
    assert batch["tokens"].shape == batch["labels"].shape == (2, max(n0, len(ds[1]["tokens"])))
    assert torch.equal(batch["tokens"][0, :n0], ds[0]["tokens"])
    assert (batch["tokens"][0, n0:] == tok.pad_id).all() and (batch["labels"][0, n0:] == IGNORE_INDEX).all()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_loads_json_list_and_json_lines(tmp_path):
    records = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "output": "d"}]
    as_list = load_instructions(write(tmp_path / "d.json", json.dumps(records)))
    as_lines = load_instructions(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n"))
    assert as_list == as_lines == [{"instruction": "a", "input": "", "output": "b"},
                                   {"instruction": "c", "input": "", "output": "d"}]


@pytest.mark.parametrize("content,message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n',
     r"d\.jsonl: record 1 \(line 2\): invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', r"record 1 \(line 2\): missing key 'output'"),
    ('{"instruction": "a", "output": 3}\n', r"record 0 \(line 1\): 'output' must be a string"),
    ('["a"]\n', r"record 0 \(line 1\): expected an object"),
    ('{"instruction": " ", "output": "b"}\n', r"record 0 \(line 1\): 'instruction' is empty"),
    ("", "the file is empty"),
])
def test_malformed_jsonl_names_file_and_record(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_instructions(write(tmp_path / "d.jsonl", content))


def test_malformed_json_list_names_file_and_record(tmp_path):
    with pytest.raises(DataError, match=r"d\.json: invalid JSON at line 2"):
        load_instructions(write(tmp_path / "d.json", '[{"instruction": "a", "output": "b"},\n oops]'))
    with pytest.raises(DataError, match=r"d\.json: record 1: missing key 'instruction'"):
        load_instructions(write(tmp_path / "d.json", '[{"instruction": "a", "output": "b"}, {"output": "c"}]'))
    with pytest.raises(DataError, match="does not exist"):
        load_instructions(tmp_path / "nope.json")
    assert issubclass(DataError, ValueError)


def test_text_dataset_packs_documents(tmp_path, tok):
    path = write(tmp_path / "t.jsonl", "\n".join(json.dumps({"text": f"after {w} comes more."}) for w in
                                                    ["monday", "tuesday", "june"] * 5))
    packed = TextDataset(path, tok, max_seq_len=16)
    stream = [t for w in ["monday", "tuesday", "june"] * 5 for t in tok.encode(f"after {w} comes more.", eos=True)]
    assert all(len(packed[i]["tokens"]) == 16 for i in range(len(packed) - 1))
    rebuilt = [packed[0]["tokens"][0].item()] + [t for i in range(len(packed)) for t in packed[i]["labels"].tolist()]
    assert rebuilt == stream  # every token is a target exactly once
    single = TextDataset(path, tok, max_seq_len=16, pack=False)
    assert len(single) == 15
    with pytest.raises(DataError, match=r"line 1"):
        TextDataset(write(tmp_path / "bad.jsonl", '{"txt": 1}\n'), tok)


def test_bundled_synthetic_data_is_regenerated_identically(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("pretrain.jsonl", "instructions_train.jsonl", "instructions_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == (SYNTHETIC_FILES["pretrain"].parent / name).read_bytes(), name
    subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--synthetic", str(tmp_path),
                    "--out", str(tmp_path / "tokenizer.model")], check=True, capture_output=True)
    assert (tmp_path / "tokenizer.model").read_bytes() == BUNDLED_TOKENIZER.read_bytes()


def test_held_out_instructions_ask_about_facts_the_training_set_never_asks_about():
    train = [json.loads(x) for x in SYNTHETIC_FILES["train"].read_text().splitlines()]
    held = [json.loads(x) for x in SYNTHETIC_FILES["heldout"].read_text().splitlines()]
    facts = {(r["task"], r["output"], r["input"] or r["instruction"]) for r in train}
    answers_by_task = {(r["task"], r["output"]) for r in train}
    assert held and train
    for r in held:
        assert (r["task"], r["output"], r["input"] or r["instruction"]) not in facts
        subject = r["input"] or r["instruction"]
        assert not any(t["task"] == r["task"] and (t["input"] or t["instruction"]) == subject for t in train)
    assert answers_by_task  # every record is well formed Alpaca data
    load_instructions(SYNTHETIC_FILES["train"])
    load_instructions(SYNTHETIC_FILES["heldout"])


def test_a_single_object_and_a_byte_order_mark_load(tmp_path):
    record = {"instruction": "Name a colour.", "input": "", "output": "red"}
    single = tmp_path / "one.json"
    single.write_text(json.dumps(record, indent=2))  # pretty-printed: several lines
    assert load_instructions(single) == [record]
    for name, text in (("bom.json", json.dumps([record, record])), ("bom.jsonl", json.dumps(record) + "\n"),
                       ("bom_one.json", json.dumps(record, indent=4))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert load_instructions(path)[0] == record, name
    two_objects = tmp_path / "two.json"  # JSON Lines in a .json file still load line by line
    two_objects.write_text(json.dumps(record) + "\n" + json.dumps(record) + "\n")
    assert len(load_instructions(two_objects)) == 2
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "instruction": "a",\n  "output": \n}\n')
    with pytest.raises(DataError, match="broken.json"):
        load_instructions(broken)


def test_a_pretty_printed_list_in_a_jsonl_file_says_why(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}], indent=2))
    with pytest.raises(DataError, match="one JSON object a line, and this one holds a JSON list"):
        load_instructions(path)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], r"messages\[0\] must be an object with 'role' and"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "b"}], "starts with an assistant message; it must start with a user"),
])
def test_chat_records_are_checked_where_they_are_read(tmp_path, messages, message):
    """A message without content was read as empty text (null was refused), and a conversation
    opening with the assistant failed later in the chat template with no file or record."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rf"{path}: record 0 \(line 1\).*{message}"):
        load_instructions(path)


def test_the_op_demo_answers_help_without_running():
    run = subprocess.run([sys.executable, "-m", "llama_adapter_fast.cli.demos.op", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and "usage:" in run.stdout and "relative error" not in run.stdout
