"""`make demo-op`: run gated_prefix_attention on one random batch through every available
backend, and print how closely each agrees with the float64 oracle and how long it took.

On a machine without a GPU the Triton kernels run under Triton's interpreter (slow, but the
same kernels) when TRITON_INTERPRET=1 is set before Python starts, as `make demo-op` does.
"""

from __future__ import annotations

import time

import torch

from llama_adapter_fast import eager_attention, gated_prefix_attention
from llama_adapter_fast.ops.custom_ops import TRITON_AVAILABLE, can_run_on


def _timed(fn, repeats: int) -> tuple[torch.Tensor, float]:
    out = fn()  # warm-up (compiles the kernels on a GPU)
    if out.is_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            prog="python -m llama_adapter_fast.cli.demos.op").parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    B, Hq, Hkv, T, D, P = (4, 32, 8, 1024, 128, 10) if device.type == "cuda" else (2, 8, 2, 64, 64, 10)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    q, k, v = rand(B, Hq, T, D), rand(B, Hkv, T, D), rand(B, Hkv, T, D)
    prefix_k, prefix_v = rand(Hkv, P, D), rand(Hkv, P, D)
    gate = torch.linspace(-1.0, 1.0, Hq, device=device)
    args = (q, k, v, prefix_k, prefix_v, gate)
    ref = eager_attention(*[t.double() for t in args], causal=True)

    print(f"gated_prefix_attention: B={B} Hq={Hq} Hkv={Hkv} T={T} D={D} P={P} causal {dtype} on {device}")
    backends = ["eager", "sdpa"]
    if TRITON_AVAILABLE and can_run_on(device):
        backends.append("triton")
    else:
        print("  triton  skipped: needs a GPU, or TRITON_INTERPRET=1 set before Python starts")
    for backend in backends:
        repeats = 5 if device.type == "cuda" else 1
        out, seconds = _timed(lambda b=backend: gated_prefix_attention(*args, backend=b), repeats)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        note = " (Triton interpreter on the CPU)" if backend == "triton" and device.type == "cpu" else ""
        print(f"  {backend:7s} relative error vs float64 oracle {err:.2e}   median {seconds * 1e3:9.2f} ms{note}")


if __name__ == "__main__":
    main()
