"""`llama-adapter-fast pretrain`: train a small LLaMA from scratch on text (the demos' bases)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="train a small LLaMA from scratch on text (demo bases)",
                       description="Train every weight of a small LLaMA on a text file (JSON Lines of {'text'} or "
                                   "one document per line) and save it as a Hugging Face folder.")
    p.add_argument("--data", required=True)
    p.add_argument("--out", dest="out_dir", default="runs/base")
    p.add_argument("--tokenizer", default=None, help="default: the bundled tokenizer")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--max-seq-len", type=int, default=128, help="the model's context length")
    p.add_argument("--block-len", type=int, default=64, help="tokens per training sequence (documents are packed)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--print-every", type=int, default=0)


def run(a: argparse.Namespace) -> int:
    from llama_adapter_fast.models.config import ModelArgs
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.recipes import pretrain
    from llama_adapter_fast.training.tokenizer import Tokenizer

    tokenizer = Tokenizer(a.tokenizer)
    args = ModelArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                     vocab_size=tokenizer.n_words, multiple_of=32, max_seq_len=a.max_seq_len, adapter_layers=0)
    if a.block_len > a.max_seq_len:
        raise ValueError(f"--block-len ({a.block_len}) must not exceed --max-seq-len ({a.max_seq_len})")
    cfg = TrainConfig(out_dir=a.out_dir, max_seq_len=a.block_len, batch_size=a.batch_size, max_steps=a.max_steps,
                      lr=a.lr, weight_decay=0.1, warmup_steps=max(1, a.max_steps // 20), seed=a.seed,
                      device=a.device, overwrite=True, print_every=a.print_every, save_every=a.max_steps)
    _, result = pretrain(cfg, args, a.data, tokenizer=tokenizer)
    print(f"base model: {a.out_dir} (loss {result.first_loss:.3f} -> {result.final_loss:.3f}, {result.seconds:.0f} s)")
    return 0
