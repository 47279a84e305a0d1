"""The base model's tokenizer, with BOS/EOS handling and the ids generation stops on.

- `Tokenizer("path/to/tokenizer.model")` reads any sentencepiece model, LLaMA's and
  LLaMA-2's own included. `Tokenizer()` reads the small model bundled with this package,
  trained on the bundled synthetic data by scripts/train_tokenizer.py with LLaMA's settings
  (BPE, byte fallback, split digits, ids 0/1/2 for unk/BOS/EOS); it is meant for the demo
  and the tests.
- `HFTokenizer("path/to/folder")` reads a Hugging Face `tokenizer.json` (the byte-level BPE
  of Llama 3, SmolLM and most checkpoints since 2024) with the `tokenizers` library, and
  its folder's `tokenizer_config.json` (EOS, pad, chat template) and
  `generation_config.json` (the stop ids: Llama 3 Instruct has several).
- `open_tokenizer(path)` picks one of the two for a file or a folder.

Both give encode(text, bos, eos) -> ids, decode(ids) -> text, n_words, bos_id, eos_id,
pad_id and stop_ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llama_adapter_fast.bundled import TOKENIZER as BUNDLED_TOKENIZER


class Tokenizer:
    """encode(text, bos=True, eos=False) -> ids and decode(ids) -> text."""

    def __init__(self, model_path: str | os.PathLike | None = None):
        from sentencepiece import SentencePieceProcessor

        path = Path(model_path) if model_path is not None else BUNDLED_TOKENIZER
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise ValueError(f"tokenizer model {path} does not exist (expected a sentencepiece tokenizer.model)")
        self.path = path
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{path} is not a sentencepiece model: {exc}") from exc
        self.n_words: int = self.sp.GetPieceSize()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # LLaMA's tokenizer has no pad token (pad_id -1); padded positions are masked out
        # anyway, so any valid id will do: use the pad id if there is one, else unk (0).
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else max(self.sp.unk_id(), 0)
        self.chat_template: str | None = None  # a sentencepiece model carries none

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, n_words={self.n_words})"

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids generation stops on: EOS."""
        return (self.eos_id,) if self.eos_id >= 0 else ()

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; BOS, EOS and padding are dropped."""
        special = {self.bos_id, self.eos_id}
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in special])


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(found, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(found).__name__}")
    return found


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFTokenizer:
    """A Hugging Face fast tokenizer (`tokenizer.json`) and its folder's special tokens.

    encode(text, bos=True) starts the ids as the tokenizer's own post-processor starts a
    sequence (Llama 3's `<|begin_of_text|>`; nothing for SmolLM2, whose tokenizer adds no
    BOS), so that prompts are what the base saw in pretraining. EOS is the
    tokenizer_config's `eos_token` (the end of turn of an instruct model), else the first of
    generation_config's `eos_token_id`; `stop_ids` are EOS and every id of
    `eos_token_id`. The pad id is the config's pad token, else EOS (padded positions carry
    no loss). `chat_template` is the config's template, or None.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as FastTokenizer
        except ImportError as exc:  # a dependency of transformers, so usually there
            raise ImportError("reading tokenizer.json needs the tokenizers package: pip install tokenizers") from exc
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer {file} does not exist (expected a Hugging Face tokenizer.json)")
        try:
            self.fast = FastTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {exc}") from exc
        self.path = file
        config = _read_json(file.parent / "tokenizer_config.json")
        generation = _read_json(file.parent / "generation_config.json")
        self.n_words: int = self.fast.get_vocab_size(with_added_tokens=True)
        self._start = self.fast.encode("", add_special_tokens=True).ids
        self.bos_id: int = self._start[0] if self._start else -1
        stops = _ids(generation.get("eos_token_id"))
        eos = self._id_of(_token_text(config.get("eos_token")), "eos_token", file)
        self.eos_id: int = eos if eos is not None else (stops[0] if stops else -1)
        self._stop_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *stops] if 0 <= i < self.n_words))
        pad = self._id_of(_token_text(config.get("pad_token")), "pad_token", file)
        self.pad_id: int = pad if pad is not None else max(self.eos_id, 0)
        template = config.get("chat_template")
        jinja = file.parent / "chat_template.jinja"  # where transformers 4.50 and later save it
        if not isinstance(template, str) and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._transformers = None  # transformers' tokenizer of the folder, for its chat templating

    def _id_of(self, token: str | None, name: str, file: Path) -> int | None:
        if token is None:
            return None
        found = self.fast.token_to_id(token)
        if found is None:
            raise ValueError(f"{file.parent / 'tokenizer_config.json'}: {name} {token!r} is not in {file.name}")
        return found

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, n_words={self.n_words})"

    @property
    def vocab_size(self) -> int:
        return self.n_words

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self.fast.encode(text, add_special_tokens=False).ids
        if bos:
            ids = self._start + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The conversation as text in the chat template, rendered by transformers'
        apply_chat_template (the folder's tokenizer, loaded once); `add_generation_prompt`
        ends it with the opening of an assistant turn."""
        if self.chat_template is None:
            raise ValueError(f"{self.path} has no chat template")
        if self._transformers is None:
            try:
                from transformers import AutoTokenizer
            except ImportError:
                raise ValueError("the chat template is applied by transformers: pip install transformers") from None
            self._transformers = AutoTokenizer.from_pretrained(str(self.path.parent))
        return self._transformers.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)

    def decode(self, ids: list[int]) -> str:
        """Text of the ids; BOS, the stop ids and padding are dropped."""
        special = {self.bos_id, self.pad_id, *self._stop_ids}
        return self.fast.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=False)


def open_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer at `path`: a sentencepiece model, a tokenizer.json, or a folder with
    either (tokenizer.model first: LLaMA and LLaMA-2 folders ship both, and the sentencepiece
    model is the original); None for the bundled one."""
    if path is None:
        return Tokenizer()
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path)
        raise ValueError(f"{path} has no tokenizer.model (sentencepiece) or tokenizer.json (Hugging Face)")
    if path.suffix == ".json":
        return HFTokenizer(path)
    return Tokenizer(path)
