"""`llama-adapter-fast demo`: pretrain a tiny LLaMA on the bundled facts, fine-tune its
adapter on instructions about three quarters of them, answer instructions about the rest."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llama_adapter_fast.bundled import SYNTHETIC_FILES
from llama_adapter_fast.cli.options import int_at_least
from llama_adapter_fast.ops import BACKENDS

DEMO_MODEL = dict(dim=128, n_layers=4, n_heads=4, multiple_of=32, max_seq_len=128)
# Sized for two CPU cores: about 80 s of pretraining (800 steps of 16 packed blocks of 64
# tokens) and 20 s of adapter fine-tuning.
DEMO_PRETRAIN = dict(batch_size=16, max_steps=800, lr=5e-3, weight_decay=0.1, warmup_steps=40, max_seq_len=64)
DEMO_FINETUNE = dict(batch_size=16, max_steps=200, lr=1e-1, weight_decay=0.02, warmup_steps=20, max_seq_len=128,
                     adapter_len=10)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="pretrain a tiny base, fine-tune its adapter, answer held-out instructions",
                       description="The whole story on a laptop CPU in about two minutes.")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--base", default=None, help="skip pretraining: use this base folder")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--pretrain-steps", type=int_at_least(1), default=None)
    p.add_argument("--finetune-steps", type=int_at_least(1), default=None)
    p.add_argument("--show", type=int, default=12, help="held-out answers to print")


def exact_matches(answers: list[str], records: list[dict]) -> int:
    """How many answers are their record's output exactly (surrounding spaces aside)."""
    return sum(a.strip() == r["output"].strip() for a, r in zip(answers, records, strict=True))


def run(a: argparse.Namespace) -> int:

    from llama_adapter_fast.generation import answer
    from llama_adapter_fast.models.config import ModelArgs
    from llama_adapter_fast.models.llama import LLaMAAdapter
    from llama_adapter_fast.training.bases import load_base
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.data import load_instructions
    from llama_adapter_fast.training.distributed import resolve_device
    from llama_adapter_fast.training.recipes import finetune, pretrain
    from llama_adapter_fast.training.tokenizer import Tokenizer

    t0 = time.perf_counter()
    out = Path(a.out)
    device = resolve_device(a.device)
    backend = a.attention_backend
    shown = "triton" if backend == "auto" and device.type == "cuda" else ("sdpa" if backend == "auto" else backend)
    tokenizer = Tokenizer()
    heldout = load_instructions(SYNTHETIC_FILES["heldout"])
    n_train = len(load_instructions(SYNTHETIC_FILES["train"]))
    print(f"LLaMA-Adapter demo on {device.type.upper()} (gated attention backend: {shown})\n")

    if a.base is None:
        args = ModelArgs(vocab_size=tokenizer.n_words, adapter_layers=0, **DEMO_MODEL)
        n_params = sum(p.numel() for p in LLaMAAdapter(args).parameters())
        steps = a.pretrain_steps or DEMO_PRETRAIN["max_steps"]
        print(f"[1/3] No pretrained LLaMA is bundled, so first a tiny one learns facts from plain sentences\n"
              f"      ({SYNTHETIC_FILES['pretrain'].name}: opposites, capitals, sequences, colours).\n"
              f"      LLaMA dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, {n_params:,} parameters, "
              f"{steps} steps, every weight trained.")
        cfg = TrainConfig(**{**DEMO_PRETRAIN, "max_steps": steps}, out_dir=str(out / "base"), device=str(device),
                          overwrite=True, print_every=max(1, steps // 8), save_every=steps, seed=0)
        _, res = pretrain(cfg, args, SYNTHETIC_FILES["pretrain"], tokenizer=tokenizer)
        print(f"      base saved as a Hugging Face folder: {out / 'base'} ({res.seconds:.0f} s)\n")
        base_dir = out / "base"
    else:
        base_dir = Path(a.base)

    base = load_base(base_dir, device=device, adapter_layers=0, attention_backend=backend).eval()
    before = answer(base, tokenizer, heldout, max_new_tokens=8, batch_size=64)
    n_layers = base.args.n_layers
    del base

    steps = a.finetune_steps or DEMO_FINETUNE["max_steps"]
    model = load_base(base_dir, device=device, adapter_len=DEMO_FINETUNE["adapter_len"], adapter_layers=n_layers,
                      attention_backend=backend)
    print(f"[2/3] Fine-tuning the adapter only: {n_layers} layers x {model.args.adapter_len} prompt vectors + "
          f"per-head gates = {model.num_adapter_parameters():,} trainable parameters, base frozen.\n"
          f"      {n_train} Alpaca-format instructions ({SYNTHETIC_FILES['train'].name}) asking about 3/4 of the "
          f"facts in wordings the base never saw; {steps} steps.")
    cfg = TrainConfig(**{**DEMO_FINETUNE, "max_steps": steps}, data=str(SYNTHETIC_FILES["train"]),
                      out_dir=str(out / "adapter"), attention_backend=backend, device=str(device), overwrite=True,
                      print_every=max(1, steps // 8), save_every=steps, seed=0)
    res = finetune(cfg, model=model, tokenizer=tokenizer)
    print(f"      loss {res.first_loss:.3f} -> {res.final_loss:.3f} ({res.seconds:.0f} s)")
    print(f"      adapter: {res.adapter_path}")
    print(f"      loss plot: {res.plot_path}\n")

    model.eval()
    after = answer(model, tokenizer, heldout, max_new_tokens=8, batch_size=64)
    print(f"[3/3] Held-out instructions: facts the instruction set never asked about "
          f"({SYNTHETIC_FILES['heldout'].name}).")
    print(f"      {'instruction [input]':50s} {'expected':9s} {'base alone':16s} with the adapter")
    step = max(1, len(heldout) // max(1, a.show))
    for i in range(0, len(heldout), step)[: a.show]:
        r = heldout[i]
        text = r["instruction"] + (f" [{r['input']}]" if r["input"] else "")
        mark = "ok" if after[i].strip() == r["output"] else "--"
        base_text = before[i].replace("\n", " ")[:16]
        print(f"      {text[:50]:50s} {r['output']:9s} {base_text:16s} {after[i][:16]:16s} {mark}")
    n_before, n_after = exact_matches(before, heldout), exact_matches(after, heldout)
    print(f"\n      exact answers on {len(heldout)} held-out instructions: base alone {n_before} "
          f"({100 * n_before / len(heldout):.0f}%), with the adapter {n_after} ({100 * n_after / len(heldout):.0f}%)")
    print(f"\nTry one: llama-adapter-fast generate --base {base_dir} --adapter {res.adapter_path} "
          f"--prompt \"Give the opposite of the word.\" --input wet")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
