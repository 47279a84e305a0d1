"""A small byte-level BPE tokenizer folder (tokenizer.json, tokenizer_config.json with a
ChatML chat template, generation_config.json) for the tests of tokenizer.json bases."""

from __future__ import annotations

import json
from pathlib import Path

from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.training.data import format_prompt

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
# ChatML, as SmolLM2's template writes it.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tokenizer(folder: Path, *, start_token: bool, vocab: int = 1000) -> Path:
    """A byte-level BPE trained on the bundled instructions (as SmolLM2's and Llama 3's are
    byte-level), its config and generation config; with start_token its post-processor
    starts every sequence with <|begin_of_text|> (Llama 3), else with nothing (SmolLM2)."""
    from tokenizers import Tokenizer as Fast
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    fast = Fast(models.BPE())
    fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    fast.decoder = decoders.ByteLevel()
    records = [json.loads(x) for x in SYNTHETIC_FILES["train"].read_text().splitlines()]
    texts = [format_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in records]
    fast.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if start_token:
        bos = fast.token_to_id("<|begin_of_text|>")
        fast.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                            special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},  # the older form of a special token
        "bos_token": "<|begin_of_text|>" if start_token else "<|im_start|>", "chat_template": CHATML}))
    (folder / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [fast.token_to_id("<|im_end|>"), fast.token_to_id("<|endoftext|>")]}))
    return folder
