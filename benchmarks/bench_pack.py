"""Padded against packed adapter fine-tuning steps on record lengths like Alpaca's: real
(non-padding) tokens per second at the same token budget.

    python -m benchmarks.bench_pack                  # the machine's preset: "gpu" or "cpu"
    python -m benchmarks.bench_pack --preset cpu --rounds 5   # shorter

Records are random tokens whose lengths are drawn from a histogram of Alpaca prompt lengths
(benchmarks/data/alpaca_lengths.json, counts only), truncated to --max-seq-len like
`finetune` truncates them; the first 40% of each record is the prompt (no loss). Both modes
are `finetune`'s own training step (llama_adapter_fast.training.trainer.Trainer) on the same model and
the same records each round: padded right-pads --grad-accum groups of --batch-size records
to the longest of the group; packed concatenates the same records into packs of at most
--batch-size * --max-seq-len tokens, the largest padded micro-batch. The modes alternate
within each round; the medians over rounds are reported, with the padding fraction of each
mode, to benchmarks/results/pack-<device>-<date>.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness
from llama_adapter_fast.models.config import ModelArgs
from llama_adapter_fast.models.llama import LLaMAAdapter
from llama_adapter_fast.training.config import TrainConfig
from llama_adapter_fast.training.data import IGNORE_INDEX
from llama_adapter_fast.training.distributed import Dist
from llama_adapter_fast.training.tokenizer import Tokenizer
from llama_adapter_fast.training.trainer import Trainer

LENGTHS = Path(__file__).resolve().parent / "data" / "alpaca_lengths.json"
MODES = ("padded", "packed")
PRESETS = {
    # LLaMA-7B's layer shapes (4 of its 32 layers), the adapter in every layer, bf16.
    "gpu": dict(model=ModelArgs(dim=4096, n_layers=4, n_heads=32, vocab_size=32000, max_seq_len=512,
                                adapter_len=10, adapter_layers=4), batch_size=8, grad_accum=4, precision="bf16"),
    # A small model for two CPU cores, with LLaMA's proportions and vocabulary.
    "cpu": dict(model=ModelArgs(dim=256, n_layers=4, n_heads=8, vocab_size=32000, multiple_of=64, max_seq_len=512,
                                adapter_len=10, adapter_layers=4), batch_size=4, grad_accum=2, precision="fp32"),
}


def sample_lengths(n: int, seed: int, path: Path = LENGTHS) -> list[int]:
    """n lengths drawn from the histogram: a bin by its count, then uniformly inside it."""
    hist = json.loads(path.read_text())
    edges, counts = hist["bin_edges"], torch.tensor(hist["counts"], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    bins = torch.multinomial(counts, n, replacement=True, generator=g).tolist()
    return [int(edges[b] + torch.rand((), generator=g).item() * (edges[b + 1] - edges[b])) for b in bins]


class SyntheticRecords(torch.utils.data.Dataset):
    """Random tokens as `finetune`'s dataset gives them: inputs, and labels that carry the
    next token on the response (the last 60%) and IGNORE_INDEX on the prompt."""

    def __init__(self, lengths: list[int], vocab_size: int, max_seq_len: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for n in lengths:
            ids = torch.randint(3, vocab_size, (min(n, max_seq_len) + 1,), generator=g)
            labels = ids[1:].clone()
            labels[: int(0.4 * labels.numel())] = IGNORE_INDEX
            self.items.append({"tokens": ids[:-1], "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def make_trainers(args: argparse.Namespace, device: torch.device) -> dict[str, Trainer]:
    preset = PRESETS[args.preset]
    margs = dataclasses.replace(preset["model"], attention_backend=args.attention_backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaMAAdapter(margs)
    if preset["precision"] == "bf16":
        model.to(torch.bfloat16)  # the base in bf16; prompts and gates train in float32
        for _, p in model.adapter_parameters():
            p.data = p.data.float()
    records = args.batch_size * args.grad_accum * (args.rounds + args.warmup)
    dataset = SyntheticRecords(sample_lengths(records, args.seed), margs.vocab_size, args.max_seq_len, args.seed)
    trainers = {}
    for mode in MODES:
        cfg = TrainConfig(max_seq_len=args.max_seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          pack=mode == "packed", max_steps=args.rounds + args.warmup, lr=1e-3, warmup_steps=0,
                          precision=preset["precision"], device=str(device),
                          attention_backend=args.attention_backend, seed=args.seed, progress=False, plot=False)
        trainers[mode] = Trainer(cfg, model, dataset, Tokenizer(), Dist(), device)
    return trainers


def bench(args: argparse.Namespace, device: torch.device) -> list[dict]:
    trainers = make_trainers(args, device)
    samples: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for r in harness.progress(range(args.warmup + args.rounds), "rounds"):
        # Alternate which mode goes first, so that neither always runs on a warmer cache.
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            harness.synchronize(device)
            start = time.perf_counter()
            stats = trainers[mode].train_step()
            harness.synchronize(device)
            seconds = time.perf_counter() - start
            if r >= args.warmup:
                samples[mode].append(dict(seconds=seconds, real_tokens=stats["real_tokens"],
                                          padding=stats["padding"], loss=stats["loss"]))
    rows = []
    for mode in MODES:
        s = samples[mode]
        rates = [x["real_tokens"] / x["seconds"] for x in s]
        median, p20, p80 = harness.quantiles(rates)
        rows.append(dict(mode=mode, rounds=len(s), real_tokens_per_s=median, real_tokens_per_s_p20=p20,
                         real_tokens_per_s_p80=p80, step_ms=statistics.median(x["seconds"] for x in s) * 1e3,
                         real_tokens_per_step=statistics.mean(x["real_tokens"] for x in s),
                         padding=statistics.mean(x["padding"] for x in s),
                         loss_first_round=s[0]["loss"]))
    ratio = rows[1]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"]
    for row in rows:
        row["packed_over_padded"] = ratio
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: gpu with CUDA, else cpu")
    p.add_argument("--device", default=None)
    p.add_argument("--attention-backend", default="auto", help="the model's attention backend (auto: triton on a GPU)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=None, help="records per padded micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (padded)")
    p.add_argument("--rounds", type=int, default=9, help="timed steps of each mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each mode first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    p.add_argument("--out", type=Path, default=None, help="file stem (default benchmarks/results/pack-<device>-<date>)")
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else harness.default_device()
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    args.batch_size = args.batch_size or PRESETS[args.preset]["batch_size"]
    args.grad_accum = args.grad_accum or PRESETS[args.preset]["grad_accum"]
    args.device = device
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.environment(args.device)
    margs = PRESETS[args.preset]["model"]
    title = (f"adapter training step, {margs.n_layers} layers of dim {margs.dim}, vocab {margs.vocab_size}; "
             f"{args.batch_size * args.grad_accum} records a step, budget {args.batch_size * args.max_seq_len} tokens")
    harness.log(f"{title} on {harness.format_environment(env)}")
    rows = [{**env, **row, "preset": args.preset, "attention_backend": args.attention_backend,
             "batch_size": args.batch_size, "grad_accum": args.grad_accum, "max_seq_len": args.max_seq_len}
            for row in bench(args, args.device)]
    stem = args.out or harness.RESULTS_DIR / f"pack-{harness.run_stem(env)}"
    csv_path = harness.write_csv(stem.with_suffix(".csv"), rows, ("mode", "real_tokens_per_s", "padding"))
    ratio = rows[1]["packed_over_padded"]
    harness.bar_plot(stem.with_suffix(".png"), [f"{r['mode']} (padding {r['padding']:.0%})" for r in rows],
                     [r["real_tokens_per_s"] for r in rows], "real (non-padding) tokens/s, median",
                     f"{title}\npacked / padded = {ratio:.2f}x; {harness.format_environment(env)}",
                     [r["real_tokens_per_s_p20"] for r in rows], [r["real_tokens_per_s_p80"] for r in rows])
    table = harness.markdown_table(
        ["mode", "real tokens/s", "p20-p80", "step ms", "real tokens/step", "padding"],
        [[r["mode"], f"{r['real_tokens_per_s']:,.0f}", f"{r['real_tokens_per_s_p20']:,.0f}-"
          f"{r['real_tokens_per_s_p80']:,.0f}", f"{r['step_ms']:.0f}", f"{r['real_tokens_per_step']:,.0f}",
          f"{r['padding']:.0%}"] for r in rows])
    lines = [f"# Padded against packed fine-tuning steps ({env['date']})", "", title + ".",
             f"{harness.format_environment(env)}; medians of {args.rounds} alternating rounds.", "", table, "",
             f"packed / padded: **{ratio:.2f}x** real tokens/s."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {csv_path}, {stem.with_suffix('.png')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
