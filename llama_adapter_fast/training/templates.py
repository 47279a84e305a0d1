"""Prompt formats: the Alpaca prompt (LLaMA-Adapter's own) and the base's chat template.

`alpaca` frames an instruction record as Stanford Alpaca does (BOS, the prompt, the answer,
EOS). `chat` renders a conversation with the chat template of the base's tokenizer, through
transformers' `apply_chat_template` (its Jinja sandbox, its special-token variables), and
tokenizes the text as transformers does (no special tokens added: the template writes
them). The loss falls on every assistant turn, the end-of-turn token included: each turn is
the text between the conversation rendered up to it with the generation prompt and the
conversation rendered through it, so the prompt tokens of training are those of generation.

An instruction record ({"instruction", "input", "output"}) is the conversation of one user
message (the instruction, then the input after a blank line) and one assistant answer; a
chat record holds its conversation under "messages".
"""

from __future__ import annotations

from llama_adapter_fast.files import file_sha256

IGNORE_INDEX = -100  # label of the positions that carry no loss (prompt and padding)
TEMPLATES = ("alpaca", "chat")
ROLES = ("system", "user", "assistant")

# The prompts of Stanford Alpaca, which LLaMA-Adapter trains and answers with.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for an instruction (and its optional input); the answer follows it."""
    if input:
        return PROMPT_DICT["prompt_input"].format(instruction=instruction, input=input)
    return PROMPT_DICT["prompt_no_input"].format(instruction=instruction)


def default_template(tokenizer) -> str:
    """"chat" when the tokenizer has a chat template, else "alpaca"."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def resolve_template(template: str | None, tokenizer) -> str:
    """`template`, checked against the tokenizer (None: its default)."""
    if template is None:
        return default_template(tokenizer)
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--template chat: the tokenizer {getattr(tokenizer, 'path', '')} has no chat template "
                         f"(tokenizer_config.json's chat_template or chat_template.jinja); use --template alpaca")
    return template


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's file (tokenizer.model or tokenizer.json), which an adapter
    file records so that generation refuses another tokenizer."""
    return file_sha256(tokenizer.path)


def record_messages(record: dict) -> list[dict[str, str]]:
    """The conversation of a record: its "messages", or the user's instruction (and input)
    and the assistant's output of an instruction record (no answer when the output is empty)."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    messages = [{"role": "user", "content": user}]
    if record.get("output"):
        messages.append({"role": "assistant", "content": record["output"]})
    return messages


def _encode_alpaca(record: dict, tokenizer) -> list[tuple[list[int], bool]]:
    if "messages" in record:
        raise ValueError("a chat record (\"messages\") needs the chat template (--template chat)")
    prompt = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")), bos=True, eos=False)
    # Encoding the answer apart from the prompt keeps the prompt tokens exactly those of generation.
    return [(prompt, False), (tokenizer.encode(record["output"], bos=False, eos=True), True)]


def _encode_chat(record: dict, tokenizer) -> list[tuple[list[int], bool]]:
    messages = record_messages(record)
    pieces: list[tuple[list[int], bool]] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        full = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (prefix.startswith(rendered) and full.startswith(prefix)):
            raise ValueError(f"the chat template of {tokenizer.path} does not render a conversation as the "
                             f"continuation of its beginning, so the loss cannot be put on assistant turn {i} alone")
        answer = tokenizer.encode(full[len(prefix):], bos=False)
        # The loss ends with the end-of-turn token: what a template renders after it (the
        # newline after ChatML's <|im_end|>) is formatting, not something the model says.
        end = next((j + 1 for j, token in enumerate(answer) if token in tokenizer.stop_ids), len(answer))
        pieces += [(tokenizer.encode(prefix[len(rendered):], bos=False), False), (answer[:end], True),
                   (answer[end:], False)]
        rendered = full
    return pieces


def encode_record(record: dict, tokenizer, max_seq_len: int, template: str = "alpaca") -> tuple[list[int], list[int]]:
    """(input ids, labels) of one record, already shifted: labels[t] is the token that
    follows inputs[t], or IGNORE_INDEX where that token is not the answer's (the prompt, the
    user's turns). Truncated to max_seq_len + 1 tokens (so at most max_seq_len inputs)."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    pieces = _encode_alpaca(record, tokenizer) if template == "alpaca" else _encode_chat(record, tokenizer)
    ids = [i for piece, _ in pieces for i in piece]
    targets = [i if loss else IGNORE_INDEX for piece, loss in pieces for i in piece]
    ids = ids[: max_seq_len + 1]
    return ids[:-1], targets[1: len(ids)]


def prompt_ids(tokenizer, item: str | dict, template: bool | str = True) -> list[int]:
    """Token ids that ask for the answer to an instruction (a string, an instruction record or
    a chat record, whose final assistant message, if any, is the expected answer and left
    out): in the Alpaca prompt (template True or "alpaca"), the chat template ("chat"), or
    the instruction's text as it is (False)."""
    if isinstance(item, str):
        item = {"instruction": item}
    if template is True or template == "alpaca":
        if "messages" in item:
            raise ValueError("a chat record (\"messages\") needs the chat template (template \"chat\")")
        return tokenizer.encode(format_prompt(item["instruction"], item.get("input", "") or ""), bos=True)
    if template is False:
        return tokenizer.encode(item["instruction"], bos=True)
    if template != "chat":
        raise ValueError(f"template must be True, False or one of {', '.join(TEMPLATES)}, got {template!r}")
    messages = record_messages({**item, "output": ""})
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True), bos=False)
