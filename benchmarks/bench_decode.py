"""Decode benchmark: one generation step of gated prefix attention (T new queries per
sequence over a KV cache), as tokens per second and as achieved bytes per second against
the card's memory bandwidth.

- decode: ``gated_prefix_attention(..., decode=True)``, the split-KV decode kernels;
- fused forward: ``decode=False``, the training forward kernel on the same call;
- two-sdpa: two ``scaled_dot_product_attention`` calls plus the gated add (how litgpt and
  PEFT's fused variants decode), on the fastest SDPA backend that runs the shape.

A step must read the cache once: 2 x B x Hkv x S x D x bytes per element for the keys and
values (the queries, the output and the prefix are small beside it). That is what "bytes"
counts, so GB/s over the card's bandwidth says how close a step is to the memory bound.
Every shape checks the decode kernels against the two-SDPA answer before it is timed.

    python -m benchmarks.bench_decode              # the GPU sweep
    python -m benchmarks.bench_decode --device cpu # the two-SDPA rows alone, small shapes
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from llama_adapter_fast import gated_prefix_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ("decode", "fused forward", "two-sdpa")
# Published peak memory bandwidth (bytes/s) of the cards the GPU runs are lent on.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
COLUMNS = (*harness.ENV_COLUMNS, "impl", "sdpa_backend", "dtype", "B", "Hq", "Hkv", "T", "S", "D", "P", "ms", "p20",
           "p80", "tokens_per_s", "bytes", "gb_per_s", "of_bandwidth", "max_rel_err", "status")


@dataclass(frozen=True)
class Step:
    B: int
    Hq: int
    Hkv: int
    S: int  # cached keys, the new ones included
    T: int = 1
    D: int = 128
    P: int = 10
    dtype: str = "bf16"

    def cache_bytes(self) -> int:
        return 2 * self.B * self.Hkv * self.S * self.D * DTYPES[self.dtype].itemsize


def gpu_steps() -> list[Step]:
    """LLaMA-3-8B's attention (32 query heads over 8 kv heads) and LLaMA-2-7B's (32 over 32),
    batches of 1 to 32, caches of 1k to 32k tokens, one new token; a chunk of 8."""
    steps = [Step(B, 32, hkv, S) for hkv in (8, 32) for B in (1, 8, 32) for S in (1024, 4096, 16384)
             if B * S * hkv <= 32 * 16384 * 8]  # at most 2 GiB of cache
    return steps + [Step(1, 32, 8, 32768), Step(4, 32, 8, 4096, T=8)]


def cpu_steps() -> list[Step]:
    return [Step(1, 8, 2, 512, D=64, dtype="fp32"), Step(4, 8, 2, 256, T=4, D=64, dtype="fp32")]


def bandwidth_of(device_name: str) -> float | None:
    return next((bw for card, bw in BANDWIDTH.items() if card in device_name), None)


def make_step(s: Step, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[s.dtype]

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    # The cache as generation holds it: (B, S_max, Hkv, D) buffers seen as (B, Hkv, S, D).
    k, v = rand(s.B, s.S, s.Hkv, s.D).transpose(1, 2), rand(s.B, s.S, s.Hkv, s.D).transpose(1, 2)
    gate = torch.full((s.Hq,), 0.5, device=device)
    return rand(s.B, s.Hq, s.T, s.D), k, v, rand(s.Hkv, s.P, s.D), rand(s.Hkv, s.P, s.D), gate


def two_sdpa(q, k, v, pk, pv, gate, backend):
    """Two SDPA calls and the gated add (causal over the cache for a chunk of T > 1)."""
    T, S = q.shape[2], k.shape[2]
    mask = None
    if T > 1:
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    gqa = q.shape[1] != k.shape[1]
    with harness.sdpa_backend(backend):
        words = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        prefix = F.scaled_dot_product_attention(q, pk.expand(q.shape[0], -1, -1, -1),
                                                pv.expand(q.shape[0], -1, -1, -1), enable_gqa=gqa)
    return words + torch.tanh(gate).view(1, -1, 1, 1).to(q.dtype) * prefix


def run_step(s: Step, device: torch.device, impls, backends: dict, timer, log: harness.RowLog, bandwidth) -> None:
    tensors = make_step(s, device)
    fields = {**asdict(s), "bytes": s.cache_bytes()}
    with torch.no_grad():
        reference = two_sdpa(*tensors, next(iter(backends.values()), None))
        for impl in impls:
            candidates = backends.items() if impl == "two-sdpa" else [("", None)]
            best = None
            for name, backend in candidates:
                if impl == "two-sdpa":
                    def call(backend=backend):
                        return two_sdpa(*tensors, backend)
                else:
                    def call(impl=impl):
                        return gated_prefix_attention(*tensors, backend="triton", decode=impl == "decode")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        err = harness.as_float(((call().float() - reference.float()).norm()
                                                / reference.float().norm()).item())
                        timing = timer(call)
                except RuntimeError as exc:  # a backend that refuses the shape, or out of memory
                    log.write({**fields, "impl": impl, "sdpa_backend": name, "status": f"error: {exc}"[:120]})
                    continue
                if best is None or timing.ms < best[1].ms:
                    best = (name, timing, err)
            if best is None:
                continue
            name, timing, err = best
            gbps = s.cache_bytes() / (timing.ms * 1e-3) / 1e9
            status = "ok" if err < (2e-2 if s.dtype != "fp32" else 1e-4) else "MISMATCH"
            log.write({**fields, "impl": impl, "sdpa_backend": name or "", "ms": timing.ms, "p20": timing.p20,
                       "p80": timing.p80, "tokens_per_s": s.B * s.T / (timing.ms * 1e-3), "gb_per_s": gbps,
                       "of_bandwidth": gbps * 1e9 / bandwidth if bandwidth else None, "max_rel_err": err,
                       "status": status})


def step_label(row: dict) -> str:
    T = int(row["T"])
    return f"B{row['B']} {row['Hq']}:{row['Hkv']} S{row['S']}" + (f" T{T}" if T > 1 else "")


def markdown(rows: list[dict]) -> str:
    """A table of one row per step: the decode kernels' time, GB/s and share of the card's
    bandwidth, and how many times faster they are than the training forward and two SDPA
    calls. Reads rows as written or as read back from the CSV."""
    by_step: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_step.setdefault((r["dtype"], step_label(r)), {})[r["impl"]] = r

    def ms(r):
        return harness.as_float(r.get("ms")) if r else None

    def cell(value, fmt):
        return format(value, fmt) if value is not None else "-"

    body = []
    for (dtype, label), impls in by_step.items():
        dec, fwd, sdpa = (impls.get(i) for i in IMPLS)
        t = ms(dec)
        share = harness.as_float(dec.get("of_bandwidth")) if dec else None
        body.append([dtype, label, cell(t, ".4f"), cell(harness.as_float(dec.get("gb_per_s")) if dec else None, ",.0f"),
                     cell(share * 100 if share is not None else None, ".0f"),
                     cell(ms(fwd), ".4f"), cell(ms(fwd) / t if t and ms(fwd) else None, ".2f"),
                     f"{cell(ms(sdpa), '.4f')}" + (f" ({sdpa['sdpa_backend']})" if sdpa else ""),
                     cell(ms(sdpa) / t if t and ms(sdpa) else None, ".2f")])
    return harness.markdown_table(["dtype", "step", "decode ms", "GB/s", "% of bandwidth", "fused forward ms",
                                   "x faster", "two-sdpa ms", "x faster"], body)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Achieved GB/s of each implementation per step, the card's bandwidth as a line."""
    plt = harness.pyplot()
    rows = [r for r in rows if r.get("gb_per_s")]
    if plt is None or not rows:
        return None
    labels = list(dict.fromkeys(step_label(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 3.6))
    width = 0.8 / len(IMPLS)
    for i, impl in enumerate(IMPLS):
        by_label = {step_label(r): r["gb_per_s"] for r in rows if r["impl"] == impl}
        ax.bar([j + i * width for j in range(len(labels))], [by_label.get(x, 0) for x in labels], width, label=impl)
    bandwidth = rows[0].get("bandwidth")
    if bandwidth:
        ax.axhline(bandwidth / 1e9, color="k", linestyle="--", linewidth=0.8, label="card's bandwidth")
    ax.set_xticks([j + width for j in range(len(labels))], labels, rotation=60, fontsize=7, ha="right")
    ax.set_ylabel("GB/s of KV cache read")
    ax.set_title(f"decode step, {rows[0]['dtype']}, {rows[0].get('device', '')}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    p.add_argument("--csv", type=Path, default=None, help="default: benchmarks/results/<run>-decode.csv")
    p.add_argument("--deadline", type=float, default=None, help="time.time() after which no new step starts")
    args = p.parse_args(argv)
    device = torch.device(args.device or harness.default_device())
    env = harness.environment(device)
    gpu = device.type == "cuda"
    steps = gpu_steps() if gpu else cpu_steps()
    impls = IMPLS if gpu else ("two-sdpa",)  # the kernels need a GPU (the interpreter is no timing)
    if gpu:
        backends = harness.available_sdpa_backends(["flash", "cudnn", "efficient"], device, torch.bfloat16)
    else:
        backends = {default_backend_name_for(steps[0], device): None}
    bandwidth = bandwidth_of(env.get("device", "")) if gpu else None
    path = args.csv or harness.RESULTS_DIR / f"{harness.run_stem(env)}-decode.csv"
    log = harness.RowLog(path, COLUMNS, fixed=env)
    timer = harness.CudaTimer(warmup_ms=5, rep_ms=25) if gpu else harness.CpuTimer()
    deadline = harness.Deadline(args.deadline)
    for s in harness.progress(steps, "decode steps"):
        if deadline.passed():
            print("deadline: the remaining steps are not run", file=sys.stderr)
            break
        run_step(s, device, impls, backends, timer, log, bandwidth)
    rows = [{**r, "bandwidth": bandwidth} for r in log.rows]
    picture = plot(rows, path.with_suffix(".png"))
    print(markdown(log.rows))
    print(f"wrote {path}" + (f" and {picture}" if picture else ""))
    return 0 if all(r.get("status") in ("ok", None) or str(r.get("status")).startswith("error")
                    for r in log.rows) else 1


def default_backend_name_for(s: Step, device: torch.device) -> str:
    """The SDPA backend torch picks by itself for the step's keys (a label for CPU rows)."""
    return harness.default_sdpa_backend(s.B, s.Hq, s.Hkv, s.S, s.S, s.D, DTYPES[s.dtype], device)


if __name__ == "__main__":
    sys.exit(main())
