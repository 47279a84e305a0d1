"""LLaMA's sentencepiece tokenizer, with BOS/EOS handling.

`Tokenizer("path/to/tokenizer.model")` reads any sentencepiece model, LLaMA's own included.
`Tokenizer()` reads the small model bundled with this package, trained on the bundled
synthetic data by scripts/train_tokenizer.py with LLaMA's settings (BPE, byte fallback,
split digits, ids 0/1/2 for unk/BOS/EOS); it is meant for the demo and the tests.
"""

from __future__ import annotations

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

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, n_words={self.n_words})"

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
