"""Prompt formats: the chat template as transformers applies it (token for token, the loss on
every assistant turn only), chat records, the default template, and the template and
tokenizer an adapter file records, which generation follows and checks."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from llama_adapter_fast import cli
from llama_adapter_fast.training.data import DataError, InstructionDataset, load_instructions
from llama_adapter_fast.training.templates import (
    IGNORE_INDEX,
    default_template,
    encode_record,
    prompt_ids,
    resolve_template,
    tokenizer_fingerprint,
)
from llama_adapter_fast.training.tokenizer import HFTokenizer, Tokenizer

from support.hf_tokenizer_files import write_tokenizer

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What colour is the sky?"},
        {"role": "assistant", "content": "blue"}, {"role": "user", "content": "And grass?"},
        {"role": "assistant", "content": "green"}]


@pytest.fixture(scope="module", params=[False, True], ids=["no-start-token", "start-token"])
def folder(request, tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), start_token=request.param)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_chat_tokens_are_transformers_own_with_the_loss_on_assistant_turns(folder):
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    tok = HFTokenizer(folder)
    inputs, labels = encode_record({"messages": CHAT}, tok, max_seq_len=512, template="chat")
    assert inputs == _ids(theirs.apply_chat_template(CHAT, tokenize=True))[:-1]
    learned = [t for t in labels if t != IGNORE_INDEX]
    # Each answer and its end-of-turn token, nothing else: not the newline the template
    # writes after <|im_end|>, which is formatting and which generation never produces.
    turn = [tok.encode(f"{a}<|im_end|>", bos=False) for a in ("blue", "green")]
    assert turn[0][-1] in tok.stop_ids and tok.encode("<|im_end|>\n", bos=False)[-1] not in tok.stop_ids
    assert learned == turn[0] + turn[1]
    assert len(inputs) == len(labels)
    # The prompt of generation is the conversation up to the last answer, with the generation prompt.
    asked = prompt_ids(tok, {"messages": CHAT}, "chat")
    assert asked == _ids(theirs.apply_chat_template(CHAT[:-1], tokenize=True, add_generation_prompt=True))
    assert inputs[: len(asked)] == asked


def test_instruction_records_in_the_chat_template(folder):
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    tok = HFTokenizer(folder)
    record = {"instruction": "Give the opposite of the word.", "input": "wet", "output": "dry"}
    conversation = [{"role": "user", "content": "Give the opposite of the word.\n\nwet"},
                    {"role": "assistant", "content": "dry"}]
    inputs, labels = encode_record(record, tok, max_seq_len=512, template="chat")
    assert inputs == _ids(theirs.apply_chat_template(conversation, tokenize=True))[:-1]
    learned = [t for t in labels if t != IGNORE_INDEX]
    assert learned == tok.encode("dry<|im_end|>", bos=False)
    assert prompt_ids(tok, record, "chat") == _ids(theirs.apply_chat_template(conversation[:1], tokenize=True,
                                                                             add_generation_prompt=True))
    short_inputs, short_labels = encode_record(record, tok, max_seq_len=5, template="chat")
    assert short_inputs == inputs[:5] and short_labels == labels[:5]


def test_default_and_resolved_templates(folder):
    assert default_template(HFTokenizer(folder)) == "chat"
    assert default_template(Tokenizer()) == "alpaca"
    assert resolve_template(None, Tokenizer()) == "alpaca"
    assert resolve_template("alpaca", HFTokenizer(folder)) == "alpaca"
    with pytest.raises(ValueError, match="--template chat: the tokenizer .* has no chat template"):
        resolve_template("chat", Tokenizer())
    with pytest.raises(ValueError, match="template must be one of"):
        resolve_template("vicuna", Tokenizer())


def test_chat_records_load_and_bad_ones_are_named(tmp_path, folder):
    good = tmp_path / "chat.jsonl"
    good.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"instruction": "Say hi", "output": "hi"}))
    records = load_instructions(good)
    assert records[0]["messages"] == CHAT and records[0]["instruction"] == "And grass?"
    assert records[0]["output"] == "green"
    dataset = InstructionDataset(records, HFTokenizer(folder), template="chat")
    assert len(dataset) == 2 and dataset.num_without_response == 0
    with pytest.raises(DataError, match="record 0: a chat record .* needs the chat template"):
        InstructionDataset(records, Tokenizer(), template="alpaca")
    bad = {
        '{"messages": []}': "'messages' must be a non-empty list",
        '{"messages": "hi"}': "'messages' must be a non-empty list",
        '{"messages": [{"role": "robot", "content": "x"}]}': "messages\\[0\\] has role 'robot'",
        '{"messages": [{"role": "user", "content": 3}]}': "messages\\[0\\] 'content' must be a string",
        '{"messages": [{"role": "user", "text": "x"}]}': "messages\\[0\\] must be an object with 'role'",
        '{"messages": [{"role": "user", "content": "x"}]}': "no assistant message",
        '{"messages": [{"role": "assistant", "content": "x"}]}': "no user message",
        '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "id": 1}':
            "a chat record holds only 'messages'",
    }
    for line, message in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(DataError, match=f"bad.jsonl: record 0 \\(line 1\\): {message}"):
            load_instructions(path)
    # Without an answer a conversation is a question to answer (generate's records).
    path.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    assert load_instructions(path, require_output=False)[0]["output"] == ""


def test_the_adapter_records_template_and_tokenizer_and_generate_checks_them(base_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(base_dir, base, ignore=shutil.ignore_patterns("tokenizer.model"))
    write_tokenizer(base, start_token=False)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": CHAT}) for _ in range(4)) + "\n")
    out = tmp_path / "run"
    common = ["--device", "cpu"]
    assert cli.main(["finetune", "--base", str(base), "--data", str(data), "--out", str(out), "--adapter-len", "2",
                     "--max-steps", "1", "--batch-size", "2", "--max-seq-len", "64", "--no-progress", *common]) == 0
    adapter = out / "adapter.safetensors"
    with safe_open(str(adapter), framework="pt") as f:
        meta = f.metadata()
    assert meta["template"] == "chat" and meta["tokenizer_sha256"] == tokenizer_fingerprint(HFTokenizer(base))
    assert json.loads((out / "train_config.json").read_text())["template"] == "chat"
    ask = ["generate", "--base", str(base), "--adapter", str(adapter), "--max-new-tokens", "2", *common]
    assert cli.main([*ask, "--instructions", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "template: chat\n" in printed and "\nanswer: " in printed
    assert cli.main([*ask, "--prompt", "hi", "--template", "alpaca"]) == 2
    assert "was trained in the chat template" in capsys.readouterr().err
    other = write_tokenizer(tmp_path / "other", start_token=True)  # another post-processor: another file
    assert cli.main([*ask, "--prompt", "hi", "--tokenizer", str(other / "tokenizer.json")]) == 2
    assert "is not the tokenizer" in capsys.readouterr().err
    assert cli.main([*ask, "--prompt", "hi", "--raw", "--template", "chat"]) == 2
    assert "--raw" in capsys.readouterr().err
    # An Alpaca-trained adapter answers in the Alpaca prompt without being told.
    assert cli.main(["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "alpaca"),
                     "--template", "alpaca", "--max-steps", "1", "--no-progress", *common]) == 2
    assert "needs the chat template" in capsys.readouterr().err
