"""GPU check of the fused kernels: correctness with real compilation.

    python benchmarks/gpu_check.py --out OUT [--dtypes bf16,fp16,fp32] [--deadline-s 400]

1. The correctness grid of the test suite, on larger shapes that cross the GPU's block
   sizes, padded and packed, in bfloat16 first (the one dtype the CPU cannot check), then
   float16 and float32: FlashAttention's criterion in 16-bit (at most twice the eager
   backend's error in the same dtype), the float64 oracle within 1e-4 in float32. Forward
   and all six gradients, and a check that the Triton kernels ran; a few cases again with
   the deterministic backward and with tiles through pointers.
2. 64-bit indexing: a problem whose q holds more than 2**31 elements.

The timings are bench_attention's (its target shapes are these lengths and more); the
first-contact script runs this grid in parallel worker processes.

Every row is appended to OUT/gpu-check.csv as it is measured, with the device and the
versions; a case that fails or raises is recorded and the check goes on; after
--deadline-s no new case starts (it is recorded as skipped). Autotuning is off for the grid
(one config per head dim keeps compilation short) unless --autotune is given.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__" and "--autotune" not in sys.argv:  # before the kernels load
    os.environ.setdefault("LLAMA_ADAPTER_FAST_AUTOTUNE", "0")

import torch

from benchmarks import harness
from llama_adapter_fast import eager_attention, gated_prefix_attention, set_deterministic
from llama_adapter_fast.kernels.utils import SETTINGS, kernel_settings
from llama_adapter_fast.ops.testing import (
    Case,
    PackedCase,
    check_against_oracle,
    check_low_precision,
    check_packed,
    expect_launches,
    rel_error,
    training_kernels,
)

GRID = {
    "gqa_causal": Case(B=2, Hq=8, Hkv=2, T=300, D=64),
    "mha_bidirectional": Case(B=2, Hq=4, Hkv=4, T=257, D=128, causal=False),
    "mqa_shared_prefix": Case(B=3, Hq=8, Hkv=1, T=200, D=128, shared_prefix=True),
    "kv_cache_chunk": Case(B=2, T=70, S=400, D=128),
    "decode": Case(B=4, T=1, S=333, D=128),
    "more_queries_than_keys": Case(T=190, S=77, D=64),
    "no_word_keys": Case(T=40, S=0, causal=False),
    "p1": Case(T=150, P=1, D=64),
    "p256": Case(T=150, P=256, D=64),
    "p70": Case(T=129, P=70, D=96),
    "d16": Case(T=200, D=16),
    "d32": Case(T=200, D=32),
    "d80": Case(T=200, D=80),
    "d96": Case(T=200, D=96),
    "d256": Case(B=1, T=200, D=256),
    "d256_bidirectional_mask": Case(B=2, T=160, D=256, causal=False, mask="empty_rows"),
    "padding_mask": Case(B=3, T=230, D=128, mask="random"),
    "fully_masked_rows_chunk": Case(B=2, T=50, S=260, D=64, mask="empty_rows"),
    "transposed": Case(B=2, Hq=8, Hkv=2, T=222, D=128, transposed=True),
    "scalar_identity_gate": Case(T=180, gate_shape=(), gate_activation="identity", D=64),
    "one_gate_scale": Case(T=180, gate_shape=(1,), softmax_scale=0.2, D=128),
    "long": Case(B=1, Hq=4, Hkv=2, T=2048, D=128),
    # Packed sequences (gated_prefix_attention_varlen): boundaries inside and at the edges of
    # the GPU's blocks, one-token and empty sequences, one sequence far longer than the others.
    "varlen_gqa": PackedCase((128, 37, 300, 1, 64), Hq=8, Hkv=2, D=128),
    "varlen_long_one": PackedCase((5, 700, 3), D=64, per_sequence_prefix=False),
    "varlen_kv_chunks": PackedCase((9, 1, 40), lens_k=(200, 65, 40), D=128),
    "varlen_bidirectional_d80": PackedCase((90, 0, 150), D=80, causal=False),
    # The other structures the launchers keep (see `structure`): the deterministic backward,
    # and tiles through pointers where the GPU would take tensor descriptors.
    "deterministic_gqa_causal": Case(B=2, Hq=8, Hkv=2, T=300, D=128, mask="random"),
    "deterministic_varlen": PackedCase((128, 37, 300), Hq=8, Hkv=2, D=64),
    "pointers_gqa_causal": Case(B=2, Hq=8, Hkv=2, T=300, D=128, mask="random"),
    "pointers_varlen": PackedCase((128, 37, 300), Hq=8, Hkv=2, D=64),
}
# The dry run's grid (Triton's interpreter on the CPU): the same kinds of case, tiny.
TINY_GRID = {
    "gqa_causal": Case(B=1, Hq=4, Hkv=2, T=20, D=16),
    "padding_mask": Case(B=2, Hq=2, Hkv=1, T=18, D=16, mask="empty_rows"),
    "varlen_gqa": PackedCase((7, 0, 12), Hq=4, Hkv=2, D=16),
    "deterministic_gqa_causal": Case(B=1, Hq=4, Hkv=2, T=20, D=16, mask="random"),
    "pointers_varlen": PackedCase((7, 0, 12), Hq=4, Hkv=2, D=16),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = (*harness.ENV_COLUMNS, "section", "name", "dtype", "status", "detail", "worst_error", "eager_error",
           "seconds")


def cases(dtype_names: Iterable[str], grid: dict | None = None) -> list[tuple[str, str, Case | PackedCase]]:
    """(name, dtype name, case) in dtype-major order."""
    grid = GRID if grid is None else grid
    return [(name, dt, type(case)(**{**case.__dict__, "dtype": DTYPES[dt]}))
            for dt in dtype_names for name, case in grid.items()]


@contextlib.contextmanager
def structure(name: str):
    """The structure a case's name asks for: "deterministic_..." the deterministic backward,
    "pointers_..." tiles through pointers; the defaults otherwise."""
    deterministic = name.startswith("deterministic_")
    set_deterministic(deterministic)
    try:
        with kernel_settings(tma=False if name.startswith("pointers_") else SETTINGS.tma):
            yield
    finally:
        set_deterministic(False)


def check_case(name: str, dtype_name: str, case: Case | PackedCase) -> dict:
    """One correctness case as a row; a failure or an exception is the row's result."""
    start = time.perf_counter()
    row = dict(section="correctness", name=name, dtype=dtype_name)
    if case.dtype == torch.bfloat16 and not torch.cuda.is_available():
        return dict(row, status="skipped", detail="Triton's interpreter has no bfloat16 arithmetic", seconds=0.0)
    try:
        with structure(name):
            result = _check(case)
        if case.dtype == torch.float32:
            worst = max(result, key=result.get)
            row.update(detail=f"max rel err {result[worst]:.1e} ({worst})", worst_error=result[worst])
        else:
            worst = max(result, key=lambda k: result[k][0] / (2 * result[k][1] + 1e-4))
            fused, eager = result[worst]
            row.update(detail=f"worst {worst}: triton {fused:.1e} vs eager {eager:.1e}", worst_error=fused,
                       eager_error=eager)
        row["status"] = "PASS"
    except Exception as exc:  # a failure is reported, and the sweep goes on
        row.update(status="FAIL", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
    return dict(row, seconds=round(time.perf_counter() - start, 2))


def _check(case: Case | PackedCase) -> dict:
    if isinstance(case, PackedCase):
        return check_packed(case, tol=1e-4)
    if case.dtype == torch.float32:
        return check_against_oracle(case, tol=1e-4)
    return check_low_precision(case)


def check_large_index() -> dict:
    """q, k, v, out and their gradients over 2**31 elements: only int64 offsets index them."""
    H, T, D, P = 8, 256, 128, 10
    B = 2**31 // (H * T * D) + 2
    start = time.perf_counter()
    row = dict(section="int64", name="over_2**31_elements", dtype="bf16")
    try:
        g = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

        q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
        pk, pv = rand(B, H, P, D), rand(B, H, P, D)
        gate = torch.full((H,), 0.7, device="cuda", requires_grad=True)
        with expect_launches(*training_kernels()):
            out = gated_prefix_attention(q, k, v, pk, pv, gate, backend="triton")
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v, pk, pv), do)
        # Batches are independent: the last one, far past 2**31 elements, against the oracle.
        last = [t[-1:].detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
        ref = eager_attention(*last, gate.detach().double())
        ref_grads = torch.autograd.grad(ref, last, do[-1:].double())
        errs = [rel_error(out[-1:], ref)] + [rel_error(a[-1:], b) for a, b in zip(grads, ref_grads, strict=True)]
        row.update(status="PASS" if max(errs) < 2e-2 else "FAIL", worst_error=max(errs),
                   detail=f"q.numel()={q.numel()} > 2**31; last batch max rel err {max(errs):.1e} (bf16)")
        del q, k, v, pk, pv, out, do, grads
    except Exception as exc:
        row.update(status="FAIL", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
    harness.release_memory()
    return dict(row, seconds=round(time.perf_counter() - start, 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV (default: none, print only)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="of the grid, in this order")
    parser.add_argument("--deadline-s", type=float, default=None, help="no new case starts after this many seconds")
    parser.add_argument("--autotune", action="store_true", help="autotune the kernels (longer compilation)")
    parser.add_argument("--skip-large", action="store_true", help="skip the over-2**31-elements check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; on the CPU run `make test` (Triton's interpreter).")
        return 2
    unknown = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)} (known: {', '.join(DTYPES)})")
    env = harness.environment("cuda")
    deadline = harness.Deadline.after(args.deadline_s)
    log = harness.RowLog(args.out / f"{harness.run_stem(env)}-gpu-check.csv" if args.out else None, COLUMNS, env)
    print(f"gpu_check on {harness.format_environment(env)}; autotune {harness.autotuning_enabled()}", flush=True)
    start = time.perf_counter()
    for name, dtype_name, case in cases(args.dtypes.split(",")):
        row = (dict(section="correctness", name=name, dtype=dtype_name, status="skipped", detail="time budget spent")
               if deadline.passed() else check_case(name, dtype_name, case))
        log.write(row)
        print(f"[{row['status']}] {dtype_name:5s} {name:26s} {row['detail']}  ({row.get('seconds', 0)} s)",
              flush=True)
    if not args.skip_large and not deadline.passed():
        row = check_large_index()
        log.write(row)
        print(f"[{row['status']}] {row['detail']}", flush=True)
    failed = sum(r["status"] == "FAIL" for r in log.rows)
    passed = sum(r["status"] == "PASS" for r in log.rows)
    print(f"\n{passed} passed, {failed} failed in {time.perf_counter() - start:.0f} s"
          + (f"; rows in {log.path}" if log.path else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
