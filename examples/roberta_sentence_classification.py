"""LLaMA-Adapter on a tiny RoBERTa: synthetic sentence classification, on a CPU in a minute or so.

The sentences are generated here from filler words and four sets of topic words, with
lengths from 6 to 24 words, padded on the right. No checkpoint is downloaded: the first
stage trains a tiny RoBERTa to name the topic of sentences about one topic (two or three of
its words among fillers), standing in for a pretrained checkpoint. The second puts the
trained encoder under a new classification head, freezes it, and `add_llama_adapter` gives
its layers prompts and zero-initialized gates; only those and the head learn a new task:
the main topic of sentences that mix two (three words of one topic, two of another).
Padding reaches the fused op as a key padding mask. At zero gates the adapted model is the
frozen encoder, so the accuracy before fine-tuning is the frozen encoder's with a fresh head.

    python -m examples.roberta_sentence_classification        # from the repository's root
    python -m examples.roberta_sentence_classification --steps 100 --pretrain-steps 200   # quicker

With a real checkpoint, skip the first stage and load the model with
``RobertaForSequenceClassification.from_pretrained(name, num_labels=..., attention_probs_dropout_prob=0.0)``.
"""

from __future__ import annotations

import argparse

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from examples.common import accuracy, add_options, parse, train
from llama_adapter_fast.integrations.transformers import add_llama_adapter

BOS, PAD, EOS = 0, 1, 2
TOPICS = [list(range(3 + 6 * t, 9 + 6 * t)) for t in range(4)]  # six words each, ids 3 to 26
FILLERS = list(range(27, 96))
VOCAB, MIN_WORDS, MAX_WORDS = 96, 6, 24


def make_sentences(n: int, generator: torch.Generator, *, mixed: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """n sentences "<s> words </s>", padded on the right to MAX_WORDS + 2 tokens, and their
    topics (0 to 3). A sentence holds two or three words of its topic among fillers, or, when
    `mixed`, three words of its topic and two of another one."""
    ids = torch.full((n, MAX_WORDS + 2), PAD)
    mask = torch.zeros(n, MAX_WORDS + 2, dtype=torch.long)
    topics = torch.randint(0, len(TOPICS), (n,), generator=generator)

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=generator))

    def pick(pool: list[int], k: int) -> list[int]:
        return [pool[draw(len(pool))] for _ in range(k)]

    for i, topic in enumerate(topics.tolist()):
        length = MIN_WORDS + draw(MAX_WORDS - MIN_WORDS + 1)
        if mixed:
            other = (topic + 1 + draw(len(TOPICS) - 1)) % len(TOPICS)
            words = pick(TOPICS[topic], 3) + pick(TOPICS[other], 2)
        else:
            words = pick(TOPICS[topic], 2 + draw(2))
        words += pick(FILLERS, length - len(words))
        order = torch.randperm(length, generator=generator).tolist()
        sentence = [BOS] + [words[j] for j in order] + [EOS]
        ids[i, :len(sentence)] = torch.tensor(sentence)
        mask[i, :len(sentence)] = 1
    return {"input_ids": ids, "attention_mask": mask}, topics


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(parser, steps=600, pretrain_steps=600, adapter_layers=4)
    args = parse(parser, argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    sizes = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=MAX_WORDS + 4, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                 attention_probs_dropout_prob=0.0, num_labels=len(TOPICS))

    # Stage 1, a stand-in for a pretrained checkpoint: the whole RoBERTa learns single topics.
    config = RobertaConfig(**sizes)
    pretrained = RobertaForSequenceClassification(config).to(device)
    single, single_topics = make_sentences(args.train_size, g, mixed=False)
    train(pretrained, single, single_topics, steps=args.pretrain_steps, batch_size=args.batch_size, lr=2e-3,
          generator=g, desc="pretraining")
    test_single = make_sentences(args.test_size, g, mixed=False)
    print(f"pretrained RoBERTa on single topics: {accuracy(pretrained, *test_single):.1%}")

    # Stage 2: the pretrained encoder under a new head; only the adapter and the head learn mixed topics.
    model = RobertaForSequenceClassification(config)
    model.roberta.load_state_dict(pretrained.roberta.state_dict())
    add_llama_adapter(model, adapter_len=args.adapter_len, adapter_layers=args.adapter_layers, train_head=True,
                      backend=args.backend)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
          f"(prompts and gates of {args.adapter_layers} layers, and the head)")
    mixed, mixed_topics = make_sentences(args.train_size, g, mixed=True)
    test_mixed = make_sentences(args.test_size, g, mixed=True)
    before = accuracy(model, *test_mixed)
    print(f"accuracy on mixed topics before fine-tuning: {before:.1%}")
    train(model, mixed, mixed_topics, steps=args.steps, batch_size=args.batch_size, lr=args.lr, generator=g,
          desc="fine-tuning the adapter")
    after = accuracy(model, *test_mixed)
    print(f"accuracy on mixed topics after fine-tuning:  {after:.1%}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
