"""Instruction data: loading with clear errors, tokenization in a prompt format (templates.py)
with the loss on response tokens only, truncation, right padding and packing.

A record is {"instruction": str, "input": str (optional), "output": str}, plus an optional
"image" (a path relative to the data file) for the multi-modal adapter, or a chat record
{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]} (one or
several turns, the loss on every assistant turn); a file is a JSON
list of records, JSON Lines (one record per line) or a single JSON object, in UTF-8 (with
or without a byte-order mark).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# PROMPT_DICT and format_prompt are imported from here too.
from llama_adapter_fast.training.templates import (  # noqa: F401
    IGNORE_INDEX,
    PROMPT_DICT,
    ROLES,
    encode_record,
    format_prompt,
)


class DataError(ValueError):
    """A malformed data file or record; the message names the file and the record."""


def _check_messages(messages: object, where: str, require_answer: bool) -> list[dict[str, str]]:
    """A chat record's "messages", checked: a non-empty list of {"role", "content"} objects
    with roles from ROLES and string contents, with an assistant turn if `require_answer`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise DataError(f"{where}: messages[{j}] must be an object with 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{j}] has role {message['role']!r}; roles are {', '.join(ROLES)}")
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{j}] 'content' must be a string, got {type(content).__name__}")
        out.append({"role": message["role"], "content": content})
    if require_answer and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    if all(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no user message")
    if next(m["role"] for m in out if m["role"] != "system") == "assistant":
        # A chat template renders an assistant turn after the prompt of a user turn.
        raise DataError(f"{where}: the conversation starts with an assistant message; it must start with a user "
                        f"message (after any system message)")
    return out


def _check_chat_record(record: dict, where: str, require_output: bool) -> dict:
    """A chat record: its messages, with the last user message as its "instruction" and a
    final assistant message as its "output" (what generation shows and compares)."""
    extra = sorted(set(record) - {"messages"})
    if extra:
        raise DataError(f"{where}: a chat record holds only 'messages', got also {extra}")
    messages = _check_messages(record["messages"], where, require_output)
    users = [m["content"] for m in messages if m["role"] == "user"]
    output = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
    return {"messages": messages, "instruction": users[-1] if users else "", "input": "", "output": output}


def _check_record(record: Any, where: str, require_output: bool) -> dict[str, str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with 'instruction', 'input' and 'output' (or 'messages'), "
                        f"got {type(record).__name__}")
    if "messages" in record:
        return _check_chat_record(record, where, require_output)
    needed = ("instruction", "output") if require_output else ("instruction",)
    for key in needed:
        if key not in record:
            raise DataError(f"{where}: missing key {key!r} (keys: {sorted(record)})")
    out = {}
    for key in ("instruction", "input", "output"):
        value = record.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:  # JSON can escape a lone surrogate ("\ud800"); no text has one
            raise DataError(f"{where}: {key!r} holds a lone surrogate {value[exc.start]!r} at character "
                            f"{exc.start}, which is not text (a broken \\u escape?)") from None
        out[key] = value
    if not out["instruction"].strip():
        raise DataError(f"{where}: 'instruction' is empty")
    image = record.get("image")
    if image is not None:  # the multi-modal adapter's image: a path relative to the data file
        if not isinstance(image, str) or not image.strip():
            raise DataError(f"{where}: 'image' must be a non-empty string (a path relative to the data file), "
                            f"got {image!r}")
        out["image"] = image
    return out


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of a file (a byte-order mark is dropped), or a DataError naming it."""
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc


def load_instructions(path: str | os.PathLike, require_output: bool = True) -> list[dict[str, str]]:
    """Read Alpaca-format records from a JSON list, a JSON Lines file (a .jsonl file, or
    any file that does not start with "["), or one JSON object (pretty-printed or not).

    Raises DataError (a ValueError) naming the file and the record (index, and line for
    JSON Lines) for a file that is a folder or not JSON, a record that is not an object, a
    missing instruction or output, or a field that is not a string (or not text: a lone
    surrogate).
    """
    path = Path(path)
    text = read_text_file(path, "data file")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    records: list[dict[str, str]] = []
    whole = None
    if path.suffix != ".jsonl" and stripped.startswith("{"):
        # One record, perhaps pretty-printed over several lines; else JSON Lines below.
        with contextlib.suppress(json.JSONDecodeError):
            whole = [json.loads(text)]
    if path.suffix != ".jsonl" and stripped.startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if whole is not None:
        for i, record in enumerate(whole):
            records.append(_check_record(record, f"{path}: record {i}", require_output))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}: record {len(records)} (line {lineno})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if not records and line.strip() == "[":
                    raise DataError(f"{path}: a .jsonl file holds one JSON object a line, and this one holds a "
                                    f"JSON list over several lines: name it .json, or write one record a line"
                                    ) from exc
                raise DataError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
            records.append(_check_record(record, where, require_output))
    if not records:
        raise DataError(f"{path}: no records")
    return records


def encode_example(record: dict[str, str], tokenizer, max_seq_len: int,
                   template: str = "alpaca") -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record in `template` (see templates.encode_record): with
    "alpaca", BOS prompt output EOS with the loss on output and EOS; truncated to
    max_seq_len + 1 tokens (so at most max_seq_len inputs)."""
    return encode_record(record, tokenizer, max_seq_len, template)


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenized records in a prompt format (`template`: "alpaca" or "chat", see
    templates.py): item i is {"tokens": LongTensor, "labels": LongTensor}."""

    def __init__(self, records: Sequence[dict[str, str]] | str | os.PathLike, tokenizer, max_seq_len: int = 512,
                 template: str = "alpaca"):
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        where = "record"
        if isinstance(records, (str, os.PathLike)):
            where = f"{records}: record"
            records = load_instructions(records)
        self.records = list(records)
        self.max_seq_len = max_seq_len
        self.template = template
        self.examples = []
        for i, record in enumerate(self.records):
            try:
                self.examples.append(encode_example(record, tokenizer, max_seq_len, template))
            except ValueError as exc:
                raise DataError(f"{where} {i}: {exc}") from None
        # Records whose prompt fills max_seq_len keep no response token and teach nothing.
        self.num_without_response = sum(all(y == IGNORE_INDEX for y in lab) for _, lab in self.examples)
        # Records with an empty answer teach the model to end its turn at once.
        self.empty_answers = [i for i, r in enumerate(self.records) if _has_empty_answer(r)]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, labels = self.examples[index]
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def _has_empty_answer(record: dict) -> bool:
    if "messages" in record:
        return any(m["role"] == "assistant" and not m["content"].strip() for m in record["messages"])
    return not record.get("output", "").strip()


class TextDataset(torch.utils.data.Dataset):
    """Plain text for pretraining a small base model, every token carrying loss: a JSON
    Lines file of {"text": ...} records, or a .txt file with one document per line.

    Each document is BOS text EOS. With pack=True (the default) the documents are joined
    into one stream cut into blocks of max_seq_len + 1 tokens, as language models are
    usually pretrained: no padding, so every position computed teaches something. With
    pack=False each document is one item, truncated to max_seq_len + 1 tokens.
    """

    def __init__(self, path: str | os.PathLike, tokenizer, max_seq_len: int = 512, pack: bool = True):
        path = Path(path)
        texts = []
        for lineno, line in enumerate(read_text_file(path, "text file").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {lineno}: invalid JSON: {exc.msg}") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}: line {lineno}: expected an object with a string 'text'")
                line = record["text"]
            texts.append(line)
        if not texts:
            raise DataError(f"{path}: no text")
        docs = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
        if pack:
            stream = [t for doc in docs for t in doc]
            block = max_seq_len + 1
            # Blocks overlap by one token so that every token of the stream is a target once.
            docs = [stream[i:i + block] for i in range(0, max(1, len(stream) - 1), block - 1)]
            docs = [d for d in docs if len(d) >= 2]
        self.examples = [(ids[: max_seq_len + 1][:-1], ids[: max_seq_len + 1][1:]) for ids in docs]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, labels = self.examples[index]
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch: tokens with pad_id, labels with
    IGNORE_INDEX. With right padding and causal attention, no real token sees a pad, so
    training needs no attention mask. Any other key holds a tensor of the same shape in
    every item (an image feature, for example): they are stacked."""
    length = max(item["tokens"].numel() for item in batch)
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, item in enumerate(batch):
        n = item["tokens"].numel()
        tokens[i, :n] = item["tokens"]
        labels[i, :n] = item["labels"]
    return {"tokens": tokens, "labels": labels, **_stacked_extras(batch)}


def _stacked_extras(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in batch]) for key in batch[0] if key not in ("tokens", "labels")}


def pack_records(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group records into packs of at most `budget` tokens: first fit, longest first (a
    record longer than the budget gets a pack of its own). Returns the positions in
    `lengths` of each pack's records, in a deterministic order."""
    if budget < 1:
        raise ValueError(f"the token budget of a pack must be >= 1, got {budget}")
    packs: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for p, free in enumerate(room):
            if lengths[i] <= free:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(budget - lengths[i])
    return packs


def collate_packed(batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | int]:
    """Concatenate records without padding into one sequence of the layout the packed
    attention takes: tokens and labels (1, L), rotary positions (1, L) restarting at 0 for
    each record, cu_seqlens (N + 1,) int32 (record i holds positions cu_seqlens[i] to
    cu_seqlens[i + 1]) and max_seqlen (an int). Each record's labels are its own next
    tokens, so no loss crosses a record boundary. Other keys are stacked, one row per
    record, as `collate` stacks them."""
    lengths = [item["tokens"].numel() for item in batch]
    return {
        "tokens": torch.cat([item["tokens"] for item in batch])[None],
        "labels": torch.cat([item["labels"] for item in batch])[None],
        "positions": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        "max_seqlen": max(lengths),
        **_stacked_extras(batch),
    }
