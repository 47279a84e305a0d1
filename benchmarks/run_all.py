"""`make bench`: the benchmark suite on whatever this machine has.

With a CUDA GPU it runs the GPU run in full (benchmarks/gpu_first_contact.py --full: the
correctness grid, every attention shape, the train step) into benchmarks/results/.
Without one it runs the part that means something on a CPU: the two-SDPA implementation
against the materialized eager one on small problems, and the adapter training step of a
small model (the thin model with its SDPA backend against PEFT's adaption prompt on
transformers' Llama), then writes the CSVs, the PNG plots and the markdown summary to
benchmarks/results/, named by device and date. Kernel timings need a GPU.

    python -m benchmarks.run_all            # what make bench runs
    python -m benchmarks.run_all --quick    # the first contact's shapes on a GPU, or fewer CPU shapes
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import bench_attention, bench_train_step, gpu_first_contact, harness
from benchmarks.harness import report

KERNELS_NEED_A_GPU = ("Kernel timings need a GPU: the fused Triton kernels were not timed on this machine "
                      "(without a GPU they only run under Triton's interpreter, which says nothing about speed). "
                      "On a GPU machine run `make bench` or `python benchmarks/gpu_first_contact.py OUT --full`.")


def run_cpu(out: Path, quick: bool) -> list[Path]:
    """The CPU part; returns the files written."""
    env = harness.environment("cpu")
    stem = harness.run_stem(env)
    attention_csv = out / f"{stem}-attention.csv"
    train_csv = out / f"{stem}-train-step.csv"
    print(f"No GPU here: the CPU part of the benchmarks on {harness.format_environment(env)}.")
    print(KERNELS_NEED_A_GPU)
    print("\n== 1. attention: two SDPA calls against the materialized eager reference (float32)")
    attention_args = ["--device", "cpu", "--preset", "cpu", "--csv", str(attention_csv)]
    if quick:
        attention_args += ["--seq-lens", "128,256", "--repeats", "3"]
    bench_attention.main(attention_args)
    print("\n== 2. adapter training step: the thin model (SDPA backend) against PEFT's adaption prompt, and the "
          "multi-modal adapter")
    bench_train_step.main(["--device", "cpu", "--preset", "cpu", "--csv", str(train_csv)]
                          + (["--steps", "3"] if quick else []))
    print("\n== 3. plots and summary")
    written = report.render([attention_csv, train_csv], out, stem)
    attention, train = report.load([attention_csv, train_csv])
    print()
    print(report.summary_tables(attention))
    print()
    print(report.train_table(train))
    return [attention_csv, train_csv, *written["png"], *written["md"]]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=harness.RESULTS_DIR, help="output folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="a shorter run")
    args = p.parse_args(argv)
    start = time.time()
    if torch.cuda.is_available():
        return gpu_first_contact.main([str(args.out)] + ([] if args.quick else ["--full"]))
    files = run_cpu(args.out, args.quick)
    print("\nfiles: " + ", ".join(str(f.relative_to(harness.REPO_ROOT)) if f.is_relative_to(harness.REPO_ROOT)
                                  else str(f) for f in files))
    print(f"CPU benchmarks finished in {time.time() - start:.0f} s. {KERNELS_NEED_A_GPU}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
