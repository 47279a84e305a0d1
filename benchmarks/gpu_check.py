"""GPU check of the fused kernels: correctness with real compilation, then a short timing.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu-check-<card>-<date>

1. The correctness grid of the test suite, on larger shapes that cross the GPU's block
   sizes, padded and packed, in float32 (against the float64 oracle, well under 1e-4),
   float16 and bfloat16 (FlashAttention's criterion: at most twice the eager backend's
   error in the same dtype). Forward and all six gradients, and a check that the Triton
   kernels ran.
2. 64-bit indexing: a problem whose q holds more than 2**31 elements.
3. Timing of forward and forward+backward, triton against sdpa and eager (medians of
   triton.testing.do_bench), bf16, head dim 128, causal, P = 10, B*T = 16k.
Prints one table at the end and writes it, with a CSV, under --out. Autotuning is off for
the grid (one config per head dim keeps compilation short) unless --autotune is given; the
timings use whatever the grid used.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import sys
import time
import traceback

if "--autotune" not in sys.argv:
    os.environ.setdefault("LLAMA_ADAPTER_FAST_AUTOTUNE", "0")

import torch  # noqa: E402
import triton  # noqa: E402

from llama_adapter_fast import eager_attention, gated_prefix_attention, sdpa_attention  # noqa: E402
from llama_adapter_fast.testing import (  # noqa: E402
    Case,
    PackedCase,
    check_against_oracle,
    check_low_precision,
    check_packed,
    expect_launches,
    rel_error,
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
}
# Packed sequences (gated_prefix_attention_varlen): boundaries inside and at the edges of
# the GPU's blocks, one-token and empty sequences, one sequence far longer than the others.
VARLEN_GRID = {
    "varlen_gqa": PackedCase((128, 37, 300, 1, 64), Hq=8, Hkv=2, D=128),
    "varlen_long_one": PackedCase((5, 700, 3), D=64, per_sequence_prefix=False),
    "varlen_kv_chunks": PackedCase((9, 1, 40), lens_k=(200, 65, 40), D=128),
    "varlen_bidirectional_d80": PackedCase((90, 0, 150), D=80, causal=False),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def run_grid(rows: list[dict]) -> None:
    grid = {**GRID, **VARLEN_GRID}
    cases = [(name, type(case)(**{**case.__dict__, "dtype": dtype}), dtype)
             for dtype in DTYPES for name, case in grid.items()]
    for name, case, dtype in cases:
        start = time.perf_counter()
        try:
            if isinstance(case, PackedCase):
                result = check_packed(case, tol=1e-4)
            elif dtype == torch.float32:
                result = check_against_oracle(case, tol=1e-4)
            else:
                result = check_low_precision(case)
            if dtype == torch.float32:
                detail = f"max rel err {max(result.values()):.1e}"
            else:
                worst_key = max(result, key=lambda k: result[k][0] / (2 * result[k][1] + 1e-4))
                f, e = result[worst_key]
                detail = f"worst {worst_key}: triton {f:.1e} vs eager {e:.1e}"
            status = "PASS"
        except Exception as exc:  # a failure is reported, and the sweep goes on
            status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        row = dict(section="correctness", name=name, dtype=str(dtype).replace("torch.", ""),
                   status=status, detail=detail, seconds=round(time.perf_counter() - start, 2))
        rows.append(row)
        print(f"[{row['status']}] {row['dtype']:8s} {name:26s} {detail}  ({row['seconds']} s)", flush=True)


def run_large_index(rows: list[dict]) -> None:
    """q, k, v, out and their gradients over 2**31 elements: only int64 offsets index them."""
    H, T, D, P = 8, 256, 128, 10
    B = 2**31 // (H * T * D) + 2
    start = time.perf_counter()
    try:
        g = torch.Generator(device="cuda").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

        q, k, v = rand(B, H, T, D), rand(B, H, T, D), rand(B, H, T, D)
        pk, pv = rand(B, H, P, D), rand(B, H, P, D)
        gate = torch.full((H,), 0.7, device="cuda", requires_grad=True)
        with expect_launches("forward", "backward_dq", "backward_dkdv"):
            out = gated_prefix_attention(q, k, v, pk, pv, gate, backend="triton")
            do = torch.randn_like(out)
            grads = torch.autograd.grad(out, (q, k, v, pk, pv), do)
        # Batches are independent: the last one, far past 2**31 elements, against the oracle.
        last = [t[-1:].detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
        ref = eager_attention(*last, gate.detach().double())
        ref_grads = torch.autograd.grad(ref, last, do[-1:].double())
        errs = [rel_error(out[-1:], ref)] + [rel_error(a[-1:], b) for a, b in zip(grads, ref_grads, strict=True)]
        status = "PASS" if max(errs) < 2e-2 else "FAIL"
        detail = f"q.numel()={q.numel()} > 2**31; last batch max rel err {max(errs):.1e} (bf16)"
        del q, k, v, pk, pv, out, do, grads
    except Exception as exc:
        status, detail = "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    torch.cuda.empty_cache()
    rows.append(dict(section="int64", name="over_2**31_elements", dtype="bfloat16", status=status,
                     detail=detail, seconds=round(time.perf_counter() - start, 2)))
    print(f"[{status}] {detail}", flush=True)


def _time_fwd_bwd(fn, inputs: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """Medians in ms of the forward, and of forward plus backward, by do_bench."""
    fwd = triton.testing.do_bench(lambda: fn(*inputs))
    do = torch.randn_like(fn(*inputs))
    both = triton.testing.do_bench(lambda: torch.autograd.grad(fn(*inputs), inputs, do))
    return fwd, both


def _random_problem(B: int, Hq: int, Hkv: int, T: int, D: int, P: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (Hkv, P, D), (Hkv, P, D)]
    tensors = [torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for s in shapes]
    return (*tensors, torch.linspace(-1, 1, Hq, device="cuda").requires_grad_())


def run_timing(rows: list[dict], seq_lens: list[int]) -> None:
    Hq, Hkv, D, P, tokens = 32, 8, 128, 10, 16384
    impls = {
        "triton": lambda *a: gated_prefix_attention(*a, backend="triton"),
        "two-sdpa": sdpa_attention,
        "eager": eager_attention,
    }
    for T in seq_lens:
        B = max(1, tokens // T)
        inputs = _random_problem(B, Hq, Hkv, T, D, P, seed=T)
        for impl, fn in impls.items():
            row = dict(section="timing", name=f"T={T} B={B}", dtype="bfloat16", status=impl)
            try:
                fwd, both = _time_fwd_bwd(fn, inputs)
                row.update(detail=f"fwd {fwd:.3f} ms  fwd+bwd {both:.3f} ms", fwd_ms=fwd, fwd_bwd_ms=both)
            except torch.OutOfMemoryError:
                row.update(detail="out of memory")
            torch.cuda.empty_cache()
            rows.append(row)
            print(f"[time] T={T:5d} B={B:3d} {impl:9s} {row['detail']}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="folder for the table and CSV")
    parser.add_argument("--autotune", action="store_true", help="autotune the kernels (longer compilation)")
    parser.add_argument("--skip-large", action="store_true", help="skip the over-2**31-elements check")
    parser.add_argument("--seq-lens", type=int, nargs="*", default=[512, 2048, 8192])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device; on the CPU run `make test` (Triton's interpreter).")
        return 2

    header = (f"gpu_check {datetime.date.today()} on {torch.cuda.get_device_name()}; torch {torch.__version__}, "
              f"triton {triton.__version__}, CUDA {torch.version.cuda}; autotune "
              f"{os.environ.get('LLAMA_ADAPTER_FAST_AUTOTUNE', '1') != '0'}")
    print(header, flush=True)
    rows: list[dict] = []
    start = time.perf_counter()
    run_grid(rows)
    if not args.skip_large:
        run_large_index(rows)
    run_timing(rows, args.seq_lens)

    failed = [r for r in rows if r["status"] == "FAIL"]
    lines = [header, "", f"{'section':12s} {'dtype':9s} {'case':26s} {'result':9s} detail"]
    lines += [f"{r['section']:12s} {r['dtype']:9s} {r['name']:26s} {r['status']:9s} {r['detail']}" for r in rows]
    passed = sum(r["status"] == "PASS" for r in rows)
    lines += ["", f"{passed} passed, {len(failed)} failed in {time.perf_counter() - start:.0f} s"]
    table = "\n".join(lines)
    print("\n" + table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.txt").write_text(table + "\n")
        with open(args.out / "gpu_check.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
