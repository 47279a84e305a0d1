"""Train the small sentencepiece tokenizer bundled for the demo and the tests.

Settings follow LLaMA's tokenizer.model: BPE, byte fallback (any text encodes), digits split,
no text normalization, ids 0/1/2 for <unk>/<s>/</s> and no pad token. The training text is
the bundled synthetic data (pretraining corpus and instructions rendered with the Alpaca
prompts), so that the demo's words are single tokens. Deterministic: one thread.

    python scripts/make_synthetic_data.py && python scripts/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "llama_adapter_fast" / "assets"
VOCAB_SIZE = 1024
NEWLINE = "\u00b6"  # stands for a newline while training, never occurs in the data


def training_text(synthetic: Path) -> list[str]:
    import sys

    sys.path.insert(0, str(ASSETS.parent.parent))
    from llama_adapter_fast.training.data import format_prompt

    lines = [json.loads(line)["text"] for line in (synthetic / "pretrain.jsonl").read_text("utf-8").splitlines()]
    for name in ("instructions_train.jsonl", "instructions_heldout.jsonl"):
        for line in (synthetic / name).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            lines.append(format_prompt(r["instruction"], r["input"]) + " " + r["output"])
    return lines


def main() -> None:
    import sentencepiece as spm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=Path, default=ASSETS / "synthetic")
    parser.add_argument("--out", type=Path, default=ASSETS / "tokenizer.model")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        # sentencepiece reads one sentence per line and puts a word boundary at the start of
        # each, so a word after a newline would only be learned with its leading-space form.
        # In the text the model reads, newlines are byte tokens and the word after one has no
        # leading space (the Alpaca prompt puts every instruction and input there). Standing
        # in for the newline with a user-defined symbol teaches the bare forms too.
        text = [line.replace("\n", NEWLINE) for line in training_text(args.synthetic)]
        corpus.write_text("\n".join(text) + "\n", encoding="utf-8")
        # Relative paths from inside the temporary folder: the model file records them, and
        # they must not depend on the folder's random name for the file to be reproducible.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            spm.SentencePieceTrainer.train(
                input=corpus.name, model_prefix="tok", model_type="bpe", vocab_size=args.vocab_size,
                character_coverage=1.0, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
                input_sentence_size=0, minloglevel=2, user_defined_symbols=[NEWLINE],
            )
        finally:
            os.chdir(cwd)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes((Path(tmp) / "tok.model").read_bytes())
    print(f"wrote {args.out} ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
