"""The whole GPU benchmark suite in one command, within a time budget (9 minutes on one H100).

    python benchmarks/gpu_suite.py OUT            # the full sweep and the train step
    python benchmarks/gpu_suite.py OUT --quick    # the speed-target shapes only, a smaller model

Every file goes under OUT, named by device and date: the attention and train-step CSVs,
the PNG plots, the markdown summary and the logs. The summary table is printed last.

1. Compile: the fused kernels' autotuning candidates are compiled for every shape in
   parallel worker processes (compile only, nothing runs on the GPU), so that the timing
   process finds every binary in Triton's cache instead of compiling one after another.
2. Attention: ``benchmarks.bench_attention`` times every shape (the speed targets first),
   after checking the fused output against SDPA.
3. Train step: ``benchmarks.bench_train_step`` on a LLaMA-7B-shaped model with
   --train-layers layers (PEFT's row needs peft and transformers; it is skipped without),
   and the multi-modal adapter with its per-sample prefix, fused and through two SDPA calls.
4. Plots and the markdown summary.
Each phase has a deadline derived from --budget-s; a shape or a variant that would start
after it is recorded as skipped, and the phases after it still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import bench_attention, common, plot  # noqa: E402
from benchmarks.processes import Job, Tee, python_command, run_pool, run_streaming  # noqa: E402

# Seconds kept for the phases after each one (the whole suite is expected to take about
# half of its default budget; the reserves only matter when something is slow).
PLOT_RESERVE_S = 25
TRAIN_RESERVE_S = {"full": 75, "quick": 50}
ATTENTION_MIN_S = {"full": 150, "quick": 45}
GRACE_S = 40  # a shape or variant that started before its deadline may finish this much later


def compile_jobs(shapes: Sequence[bench_attention.Shape], workers: int, preset: str,
                 train_args: list[str]) -> list[Job]:
    """One job per (dtype, head dim, kv heads) group and share of the autotuning candidates,
    plus one for the train-step model. Within a group the shapes share most compiled
    kernels, so one process compiles them one after another and reuses its own cache."""
    groups = list(dict.fromkeys((s.dtype, s.D, s.Hkv) for s in shapes))
    shards = max(1, min(6, round(2 * workers / max(1, len(groups)))))
    jobs = [Job("compile train-step model", python_command("benchmarks.bench_train_step", "--compile-only",
                                                           *train_args))]
    for dtype, D, hkv in groups:
        for i in range(shards):
            jobs.append(Job(
                f"compile {dtype} D={D} Hkv={hkv} candidates {i}/{shards}",
                python_command("benchmarks.bench_attention", "--compile-only", "--preset", preset,
                               "--dtypes", dtype, "--head-dims", str(D), "--kv-heads", str(hkv),
                               "--config-shard", f"{i}/{shards}"),
            ))
    return jobs


# ----------------------------------------------------------------------------------------
# The suite


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (created): every file of the run goes there")
    p.add_argument("--quick", action="store_true",
                   help="the speed-target shapes only (bf16, D=128, T=512/2k/8k) and a 4-layer model")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole suite (default: 500 s, 300 s with --quick)")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: CPU cores - 1)")
    p.add_argument("--no-precompile", action="store_true", help="let the timing process compile as it goes")
    p.add_argument("--train-layers", type=int, default=None, help="layers of the 7B-shaped model (default 8, 4 quick)")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 5, 3 quick)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    kind = "quick" if args.quick else "full"
    budget = args.budget_s or (300.0 if args.quick else 500.0)
    end = start + budget
    if not torch.cuda.is_available():
        print("gpu_suite needs a CUDA GPU. On this machine `make bench` runs the CPU part "
              "(python -m benchmarks.run_all); kernel timings need a GPU.")
        return 2
    env = common.environment("cuda")
    stem = common.run_stem(env)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    say = Tee(out / f"{stem}-suite.log")
    extra = common.extra_environment()
    props = torch.cuda.get_device_properties(0)
    say(f"GPU suite ({kind}) on {common.format_environment(env)}; {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB; python {extra['python']}, "
        f"transformers {extra['transformers'] or 'not installed'}, peft {extra['peft'] or 'not installed'}"
        + (f"; commit {extra['commit']}" if extra["commit"] else ""))
    say(f"budget {budget:.0f} s; output {out.resolve()}")

    preset = "targets" if args.quick else "gpu"
    shapes = bench_attention.target_shapes() if args.quick else bench_attention.sweep()
    train_args = ["--layers", str(args.train_layers or (4 if args.quick else 8))]
    attention_csv = out / f"{stem}-attention.csv"
    train_csv = out / f"{stem}-train-step.csv"

    # 1. Compile in parallel.
    compile_deadline = common.Deadline(end - PLOT_RESERVE_S - TRAIN_RESERVE_S[kind] - ATTENTION_MIN_S[kind])
    if not args.no_precompile:
        workers = args.workers or max(1, min(16, os.cpu_count() or 1) - 1)
        jobs = compile_jobs(shapes, workers, preset, train_args)
        say(f"\n== 1. compiling the fused kernels: {len(jobs)} jobs on {workers} processes")
        t0 = time.time()
        run_pool(jobs, workers, compile_deadline, say, out / f"{stem}-compile.log")
        done = sum(j.result == "ok" for j in jobs)
        say(f"   {done}/{len(jobs)} compile jobs finished in {time.time() - t0:.0f} s "
            f"(log: {stem}-compile.log)")

    # 2. Attention.
    attention_deadline = end - PLOT_RESERVE_S - TRAIN_RESERVE_S[kind]
    say(f"\n== 2. attention: {len(shapes)} shapes")
    run_streaming(python_command("benchmarks.bench_attention", "--preset", preset, "--csv", str(attention_csv),
                                 "--deadline", f"{attention_deadline:.0f}"),
                  say, attention_deadline + GRACE_S - time.time())

    # 3. Train step.
    train_deadline = end - PLOT_RESERVE_S - 20
    say("\n== 3. adapter training step")
    steps = str(args.train_steps or (3 if args.quick else 5))
    run_streaming(python_command("benchmarks.bench_train_step", *train_args, "--steps", steps,
                                 "--csv", str(train_csv), "--deadline", f"{train_deadline:.0f}"),
                  say, end - 10 - time.time())

    # 4. Plots and summary.
    say("\n== 4. plots and summary")
    csvs = [p for p in (attention_csv, train_csv) if p.is_file()]
    written = {"png": [], "md": []}
    if csvs:
        try:
            written = plot.render(csvs, out, stem)
        except Exception as exc:  # the CSVs are the result; a plotting failure must not hide them
            say(f"!! plotting failed: {type(exc).__name__}: {exc}")
    print_summary(say, csvs, written, out, start, budget)
    say.close()
    return 0


def print_summary(say: Tee, csvs: Sequence[Path], written: dict, out: Path, start: float, budget: float) -> None:
    attention, train = plot.load(csvs) if csvs else ([], [])
    say("\n" + "=" * 100)
    say(f"SUMMARY: {common.format_environment((attention or train)[0]) if attention or train else 'no results'}")
    if attention:
        say(plot.summary_tables(attention))
        say("")
    if train:
        say(plot.train_table(train))
        say("")
    notes = plot.problems(attention, train)
    if notes:
        say(f"not measured or flagged ({len(notes)}):")
        for line in notes[:20]:
            say(f"  - {line}")
        if len(notes) > 20:
            say(f"  ... {len(notes) - 20} more in the summary file")
    mismatches = sum(1 for r in attention if r["impl"] == "fused" and r["status"] == "mismatch")
    if mismatches:
        say(f"!! the fused output differed from SDPA in {mismatches // 3} shapes: see the notes")
    files = [*csvs, *written.get("png", []), *written.get("md", [])]
    say("files: " + ", ".join(p.name for p in files) + f" (in {out})")
    say(f"GPU suite finished in {time.time() - start:.0f} s (budget {budget:.0f} s)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
