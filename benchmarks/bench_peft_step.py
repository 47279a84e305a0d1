"""A PEFT adaption-prompt training step: PEFT's own attention against the fused op.

    python -m benchmarks.bench_peft_step              # Llama, width 512, 8 layers, seq 256, vocab 1024
    python -m benchmarks.bench_peft_step --vocab 32000 --tag vocab32000   # LLaMA's vocabulary
    python -m benchmarks.bench_peft_step --arch gpt2 --tag gpt2           # GPT-2 at the same sizes
    python -m benchmarks.bench_peft_step --profile    # also print where the time goes

One randomly initialized Llama or GPT-2 (nothing is downloaded) wrapped by peft.get_peft_model with
AdaptionPromptConfig; the same model and the same batch run a full training step (forward,
cross-entropy loss, backward, AdamW step on the adaption prompts and gates) through
PEFT's AdaptedAttention (AdaptedAttentionGPT) and, after `enable_fused_adaption_prompt`, through the fused op,
in alternating rounds so that both see the same machine state. Before timing, the loss
and the gradients of both paths are compared. Writes a CSV, a markdown summary and a PNG
under --out, named by device and date.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import AdaptionPromptConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from benchmarks import harness
from llama_adapter_fast.integrations.peft import disable_fused_adaption_prompt, enable_fused_adaption_prompt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("llama", "gpt2"), default="llama")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8, help="Llama only (GPT-2 is multi-head)")
    p.add_argument("--intermediate", type=int, default=1376, help="Llama's 11008/4096 ratio at width 512")
    p.add_argument("--vocab", type=int, default=1024,
                   help="the bundled tokenizer's size; LLaMA's 32000 makes the output layer 40%% of the step here")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--adapter-len", type=int, default=10)
    p.add_argument("--adapter-layers", type=int, default=None, help="default: all layers")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backend", default="auto", help="the fused op's backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each path")
    p.add_argument("--rounds", type=int, default=5, help="timed steps of each path, alternating")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step of each path")
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR)
    p.add_argument("--tag", default="", help="appended to the names of the result files")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if args.arch == "gpt2":
        config = GPT2Config(
            vocab_size=args.vocab, n_embd=args.hidden, n_inner=args.intermediate, n_layer=args.layers,
            n_head=args.heads, n_positions=max(1024, args.seq), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
        )
        model = GPT2LMHeadModel(config).to(device=device, dtype=dtype)
    else:
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=max(2048, args.seq), attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    peft_config = AdaptionPromptConfig(
        adapter_len=args.adapter_len, adapter_layers=args.adapter_layers or args.layers, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, peft_config)
    model.train()
    with torch.no_grad():  # PEFT starts at zero gates; non-zero ones make the check meaningful
        for name, param in model.named_parameters():
            if name.endswith("adaption_gate"):
                param.fill_(0.1)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def check_parity(model, batch, backend: str) -> dict[str, float]:
    """Loss and gradients of PEFT's path and the fused path on the same batch."""
    results = []
    for fused in (False, True):
        if fused:
            enable_fused_adaption_prompt(model, backend=backend)
        else:
            disable_fused_adaption_prompt(model)
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, trainable(model))
        results.append((loss.detach().float(), [g.float() for g in grads]))
    disable_fused_adaption_prompt(model)
    (loss0, grads0), (loss1, grads1) = results
    grad_err = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(grads1, grads0, strict=True))
    return {"loss_peft": loss0.item(), "loss_fused": loss1.item(), "max_grad_rel_error": grad_err}


def make_step(model, batch, optimizer, device):
    """One training step; returns (wall-clock ms, CPU ms of this process)."""

    def step() -> tuple[float, float]:
        harness.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        harness.synchronize(device)
        return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3

    return step


def set_path(model, fused: bool, backend: str) -> None:
    if fused:
        enable_fused_adaption_prompt(model, backend=backend)
    else:
        disable_fused_adaption_prompt(model)


def profile_step(step, label: str, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== {label}: top operators ==")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.environment(device)
    extra = harness.extra_environment()
    print(f"{harness.format_environment(env)}; transformers {extra['transformers']}, peft {extra['peft']}", flush=True)

    model = build_model(args, device, dtype)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": input_ids, "labels": input_ids, "use_cache": False}
    parity = check_parity(model, batch, args.backend)
    print(f"parity: {parity}", flush=True)

    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    step = make_step(model, batch, optimizer, device)
    paths = {"peft": False, "fused": True}
    for name, fused in paths.items():
        set_path(model, fused, args.backend)
        for _ in range(args.warmup):
            step()
        if args.profile:
            profile_step(step, name, device)
    wall: dict[str, list[float]] = {name: [] for name in paths}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(args.rounds):
        # Alternate the order too, so that neither path always runs right after the other.
        for name, fused in (paths.items() if i % 2 == 0 else reversed(paths.items())):
            set_path(model, fused, args.backend)
            wall_ms, cpu_ms = step()
            wall[name].append(wall_ms)
            cpu[name].append(cpu_ms)
    disable_fused_adaption_prompt(model)

    summary = {clock: speedups(times) for clock, times in (("wall", wall), ("cpu", cpu))}
    shape = {
        "arch": args.arch, "hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
        "intermediate": args.intermediate, "vocab": args.vocab, "seq": args.seq, "batch": args.batch,
        "adapter_len": args.adapter_len, "adapter_layers": args.adapter_layers or args.layers,
        "dtype": str(dtype).removeprefix("torch."), "backend": args.backend, "threads": torch.get_num_threads(),
    }
    rows = []
    for name in paths:
        row = {**env, "transformers": extra["transformers"], "peft": extra["peft"], **shape, "path": name,
               "steps": len(wall[name])}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ms, p20, p80 = harness.quantiles(times[name])
            row.update({f"{clock}_ms": ms, f"{clock}_p20_ms": p20, f"{clock}_p80_ms": p80,
                        f"{clock}_speedup_medians": summary[clock]["medians"],
                        f"{clock}_speedup_paired": summary[clock]["paired"],
                        f"{clock}_all_ms": " ".join(f"{t:.1f}" for t in times[name])})
        rows.append({**row, **parity})
    for row in rows:
        print(f"{row['path']:>6}: wall {row['wall_ms']:9.1f} ms per step (p20 {row['wall_p20_ms']:.1f}, "
              f"p80 {row['wall_p80_ms']:.1f}); CPU {row['cpu_ms']:9.1f} ms")
    for clock, label in (("wall", "wall clock"), ("cpu", "CPU time")):
        print(f"fused speedup over PEFT, {label}: {summary[clock]['medians']:.3f}x (ratio of medians), "
              f"{summary[clock]['paired']:.3f}x (median of per-round ratios)")
    if not args.no_save:
        stem = f"peft-step-{harness.run_stem(env)}" + (f"-{args.tag}" if args.tag else "")
        csv_path = harness.write_csv(args.out / f"{stem}.csv", rows)
        md_path = write_markdown(args.out / f"{stem}.md", env, extra, shape, rows, parity, summary, device)
        png_path = write_plot(args.out / f"{stem}.png", rows, env, shape)
        print("wrote", csv_path, md_path, png_path or "(no plot: matplotlib missing)")
    return 0


def speedups(times: dict[str, list[float]]) -> dict[str, float]:
    """PEFT's time over the fused time: the ratio of the medians, and the median of the
    per-round ratios (the two steps of a round see the same load on a shared machine)."""
    paired = [p / f for p, f in zip(times["peft"], times["fused"], strict=True)]
    return {"medians": statistics.median(times["peft"]) / statistics.median(times["fused"]),
            "paired": statistics.median(paired)}


def write_markdown(path: Path, env, extra, shape, rows, parity, summary, device) -> Path:
    table = harness.markdown_table(
        ["path", "wall ms/step (median)", "p20", "p80", "CPU ms/step (median)", "p20", "p80"],
        [[r["path"], *(f"{r[k]:.1f}" for k in ("wall_ms", "wall_p20_ms", "wall_p80_ms", "cpu_ms", "cpu_p20_ms",
                                                 "cpu_p80_ms"))] for r in rows])
    speedup = [["wall clock", f"**{summary['wall']['medians']:.3f}x**", f"{summary['wall']['paired']:.3f}x"]]
    if device.type == "cpu":
        # CPU time leaves out the time the process waits for a core, which a shared machine adds
        # to the wall clock at random.
        speedup.append(["CPU time of the process", f"**{summary['cpu']['medians']:.3f}x**",
                        f"{summary['cpu']['paired']:.3f}x"])
    lines = [
        "# PEFT adaption-prompt training step: PEFT's attention vs the fused op",
        "",
        f"- device: {harness.format_environment(env)}",
        f"- transformers {extra['transformers']}, peft {extra['peft']}, python {extra['python']}, "
        f"commit {extra['commit'] or 'n/a'}, date {env['date']}",
        "- model: " + ", ".join(f"{k} {v}" for k, v in shape.items()),
        "- step: forward, cross-entropy loss, backward, AdamW on the adaption prompts and gates; "
        f"the two paths alternate on the same model and batch, {rows[0]['steps']} timed steps each",
        f"- parity before timing: loss {parity['loss_peft']:.6f} (PEFT) vs {parity['loss_fused']:.6f} (fused), "
        f"largest relative gradient error {parity['max_grad_rel_error']:.2e}",
        "- the output layer and the loss (vocab x hidden) cost the same in both paths, so a large vocabulary "
        "dilutes the ratio",
        "", table, "",
        harness.markdown_table(["fused speedup over PEFT", "ratio of the medians", "median of the per-round ratios"],
                               speedup),
        "", "Every step, in order (wall ms): " + "; ".join(f"{r['path']} {r['wall_all_ms']}" for r in rows), "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_plot(path: Path, rows, env, shape) -> Path | None:
    return harness.bar_plot(path, [r["path"] for r in rows], [r["wall_ms"] for r in rows],
                            "ms per training step (median, wall clock)",
                            f"PEFT adaption prompt, {shape['arch']}, {env['device']}: width {shape['hidden']}, "
                            f"{shape['layers']} layers, seq {shape['seq']}, vocab {shape['vocab']}",
                            [r["wall_p20_ms"] for r in rows], [r["wall_p80_ms"] for r in rows])


if __name__ == "__main__":
    sys.exit(main())
