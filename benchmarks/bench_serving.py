"""Serving several adapters over one base: tokens per second of one batch that mixes
adapters and the base, against the same requests one at a time, in vLLM (this package's
plugin) and in this package's own `generate` (AdapterBank), on SmolLM2-135M-Instruct.

    python -m benchmarks.bench_serving            # in vLLM's environment (make test-vllm builds it)

Every path answers the same requests (--requests prompts of 9 to 24 tokens, cycling over
two random adapters and the base, --new-tokens greedy tokens each, no early stop) and
checks that its tokens agree with the package's for each request's adapter; medians of
--rounds alternating rounds after a warm-up, as CSV, markdown and PNG under --out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import harness

PATHS = ("vllm mixed batch", "vllm one at a time", "package mixed batch", "package one at a time")
NAMES = ("a", "b", None)  # two adapters and the base, in turn


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from llama_adapter_fast.cli.demos.real import bundled_gguf
    from llama_adapter_fast.generation import generate
    from llama_adapter_fast.integrations.vllm import lora_folder, served_model_folder
    from llama_adapter_fast.models import AdapterBank, LLaMAAdapter
    from llama_adapter_fast.models.formats.gguf import gguf_base_folder
    from llama_adapter_fast.models.formats.native import read_adapter_config

    args = parse_args(argv)
    env = harness.environment(torch.device("cpu"))
    vllm_version = harness.package_version("vllm-cpu") or harness.package_version("vllm")
    print(f"{harness.format_environment(env)}; vLLM {vllm_version}", flush=True)
    base = gguf_base_folder(bundled_gguf())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 49152, (int(n),), generator=g).tolist()
               for n in torch.randint(9, 25, (args.requests,), generator=g)]
    names = [NAMES[i % len(NAMES)] for i in range(args.requests)]
    model = LLaMAAdapter.from_hf(base, adapter_len=10, adapter_layers=15, dtype=torch.float32).eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    bank = AdapterBank(model)
    files = {}
    for seed, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(seed + 1)
        state = {n: torch.randn(p.shape, generator=gen) * 0.8 for n, p in model.adapter_parameters()}
        bank.load(name, state)
        model.load_adapter(state)
        model.save_adapter(tmp / f"{name}.safetensors")
        files[name] = tmp / f"{name}.safetensors"
    folder = served_model_folder(base, None, tmp / "served", settings=read_adapter_config(files["a"]))
    loras = {n: LoRARequest(n, i + 1, str(lora_folder(base, files[n], tmp / f"lora-{n}")))
             for i, n in enumerate(files)}
    llm = LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=256, seed=0, enable_lora=True,
              max_loras=2, max_lora_rank=8)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

    def vllm_run(batch: list[int]) -> list[list[int]]:
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in batch], params,
                            lora_request=[None if names[i] is None else loras[names[i]] for i in batch],
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def package_run(batch: list[int]) -> list[list[int]]:
        return generate(model, [prompts[i] for i in batch], max_new_tokens=args.new_tokens, adapters=bank,
                        adapter_names=[names[i] for i in batch])

    everyone = list(range(args.requests))
    runs = {
        "vllm mixed batch": lambda: vllm_run(everyone),
        "vllm one at a time": lambda: [vllm_run([i])[0] for i in everyone],
        "package mixed batch": lambda: package_run(everyone),
        "package one at a time": lambda: [package_run([i])[0] for i in everyone],
    }
    answers = {name: run() for name, run in runs.items()}  # the warm-up, and the check
    agree = {name: sum(a == b for a, b in zip(tokens, answers["package one at a time"], strict=True))
             for name, tokens in answers.items()}
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for r in harness.progress(range(args.rounds), desc="rounds"):
        for name in PATHS if r % 2 == 0 else reversed(PATHS):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    new = args.requests * args.new_tokens
    rows = []
    for name in PATHS:
        seconds, p20, p80 = harness.quantiles(times[name])
        rows.append({**env, "vllm": vllm_version, "path": name, "requests": args.requests,
                     "new_tokens": args.new_tokens, "adapters": "a, b, base in turn", "dtype": "float32",
                     "rounds": args.rounds, "seconds": seconds, "seconds_p20": p20, "seconds_p80": p80,
                     "tokens_per_s": new / seconds, "agree_with_package_alone": agree[name]})
    one_at_a_time = {r["path"].split()[0]: r["tokens_per_s"] for r in rows if r["path"].endswith("one at a time")}
    for row in rows:
        row["vs_one_at_a_time"] = row["tokens_per_s"] / one_at_a_time[row["path"].split()[0]]
    body = [[r["path"], f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['vs_one_at_a_time']:.2f}x",
             f"{r['agree_with_package_alone']}/{args.requests}"] for r in rows]
    table = harness.markdown_table(["path", "seconds (median)", "new tokens/s", "vs one at a time",
                                    "answers equal to the package's alone"], body)
    print(table)
    if not args.no_save:
        stem = f"serving-{harness.run_stem(env)}"
        csv = harness.write_csv(args.out / f"{stem}.csv", rows)
        md = args.out / f"{stem}.md"
        md.write_text(f"# Serving two adapters and the base from one engine: SmolLM2-135M-Instruct\n\n"
                      f"{harness.format_environment(env)}; vLLM {vllm_version} (CPU build, eager).\n"
                      f"{args.requests} requests of 9 to 24 prompt tokens, adapters a, b and the base in turn, "
                      f"{args.new_tokens} greedy tokens each, float32; adapters in the top 15 of 30 layers x 10 "
                      f"prompts; medians of {args.rounds} alternating rounds.\n\n{table}\n")
        png = harness.bar_plot(args.out / f"{stem}.png", [r["path"].replace(" ", "\n", 1) for r in rows],
                               [r["tokens_per_s"] for r in rows], "new tokens / s (median)",
                               f"Mixed-adapter serving, SmolLM2-135M, {env['device_name']}")
        print("wrote", csv, md, png or "(no plot: matplotlib missing)")
    return rows


if __name__ == "__main__":
    main()
