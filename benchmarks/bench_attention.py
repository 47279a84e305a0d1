"""Microbenchmark of gated prefix attention: forward, backward and forward+backward time,
TFLOP/s and peak memory of

- fused: ``gated_prefix_attention(backend="triton")``, the fused Triton kernels;
- fused-previous: the kernels' previous structure, kept reachable until a GPU has chosen:
  tiles through per-thread pointers (no tensor descriptors), the prefix after the word loop,
  and the two-kernel deterministic backward (seven products per tile pair instead of five);
- flex: FlexAttention (torch's own Triton attention, compiled), two calls plus the gated
  add: one call cannot keep the prefix's softmax apart from the words';
- eager: the materialized reference (how PEFT's adaption prompt and the original
  LLaMA-Adapter code compute it);
- two-sdpa: two ``scaled_dot_product_attention`` calls plus the gated add (how litgpt and
  LLaMA2-Accessory compute it), once per SDPA backend the machine has;
- sdpa floor: plain causal SDPA without any prefix, on the backend that ran two-sdpa
  fastest: what the adapter would cost if it were free.

Each row also gives its speedup over the best baseline of its shape and mode (the fastest
of eager, two-sdpa on every backend and flex; above 1 is faster).

Times are medians of ``triton.testing.do_bench`` with the 20th and 80th percentiles on a
GPU, perf_counter medians on the CPU. FLOPs are counted as FlashAttention counts them:
forward 4*B*H*T*S*D, halved when causal, plus the prefix term 4*B*H*T*P*D; backward 2.5x
the forward. Every shape checks the fused output and gradients against SDPA before it is
timed. A baseline that runs out of memory or that a backend refuses is recorded as such.

    python -m benchmarks.bench_attention                  # the full sweep (GPU) or the CPU part
    python -m benchmarks.bench_attention --preset targets # the shapes of the speed targets
    python -m benchmarks.bench_attention --preset compare # new kernels, previous ones, baselines: T 256 to 16k
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import harness
from llama_adapter_fast import gated_prefix_attention
from llama_adapter_fast.kernels.utils import kernel_settings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = harness.MODES
BACKWARD_FLOPS_RATIO = 2.5  # FlashAttention's convention: the backward does 2.5x the forward's matmuls

# The GPU sweep: B * T = 16k tokens, 32 query heads, P = 10, causal.
SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192, 16384)
TOKENS = 16384
Q_HEADS = 32
KV_HEADS = (32, 8)
HEAD_DIMS = (128, 64)
GPU_DTYPES = ("bf16", "fp16")
PREFIX_LEN = 10
# The speed targets: bf16, D = 128, causal, P = 10, B * T = 16k, T = 512, 2k and 8k.
TARGET_SEQ_LENS = (512, 2048, 8192)
# The first contact's comparison of the new kernels with the previous ones and the baselines:
# bf16, D = 128 then 64, 32 query heads over 8 kv heads, T = 256 to 16k.
COMPARE_HEAD_DIMS = (128, 64)
# The implementations that compute the op (not the floor): the best of them is the baseline.
BASELINES = ("eager", "two-sdpa", "flex")

# The CPU part: small float32 problems, SDPA against eager only.
CPU_SEQ_LENS = (128, 256, 512)
CPU_TOKENS = 1024
CPU_Q_HEADS = 8
CPU_KV_HEADS = (8, 2)
CPU_HEAD_DIMS = (64,)

COLUMNS = (*harness.ENV_COLUMNS, "bench", "impl", "sdpa_backend", "tuning", "dtype", "B", "T", "S", "Hq", "Hkv",
           "D", "P", "causal", "mode", "ms", "ms_p20", "ms_p80", "tflops", "speedup_vs_best", "peak_mem_mib",
           "status", "out_err", "grad_err", "note")


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Hq: int
    Hkv: int
    D: int
    P: int
    dtype: str
    causal: bool = True

    @property
    def S(self) -> int:
        return self.T

    @property
    def headline(self) -> bool:
        """The configuration of the main plot and of the speed targets: bf16, D = 128."""
        return self.dtype == "bf16" and self.D == 128

    def describe(self) -> str:
        return f"{self.dtype} D={self.D} Hq={self.Hq} Hkv={self.Hkv} T={self.T} B={self.B}"


def sweep(seq_lens: Sequence[int] = SEQ_LENS, tokens: int = TOKENS, head_dims: Sequence[int] = HEAD_DIMS,
          kv_heads: Sequence[int] = KV_HEADS, dtypes: Sequence[str] = GPU_DTYPES, q_heads: int = Q_HEADS,
          prefix_len: int = PREFIX_LEN) -> list[Shape]:
    """Every combination, B = tokens // T, ordered by priority: the target shapes first, then
    bf16 before fp16 and D = 128 before 64, each by increasing T."""
    shapes = [
        Shape(B=max(1, tokens // T), T=T, Hq=q_heads, Hkv=hkv, D=D, P=prefix_len, dtype=dt)
        for dt in dtypes for D in head_dims for T in sorted(seq_lens) for hkv in kv_heads
    ]
    targets = set(target_shapes())
    return [s for s in shapes if s in targets] + [s for s in shapes if s not in targets]


def target_shapes() -> list[Shape]:
    """The shapes of the speed targets: bf16, D = 128, causal, P = 10, B * T = 16k tokens,
    T = 512, 2k and 8k, 32 query heads with 32 and with 8 kv heads."""
    return [
        Shape(B=TOKENS // T, T=T, Hq=Q_HEADS, Hkv=hkv, D=128, P=PREFIX_LEN, dtype="bf16")
        for T in TARGET_SEQ_LENS for hkv in KV_HEADS
    ]


def compare_shapes() -> list[Shape]:
    """The first contact's shapes, in order of worth: bf16, D = 128 then 64, GQA 32/8,
    B * T = 16k tokens, T = 256 to 16k."""
    return [Shape(B=max(1, TOKENS // T), T=T, Hq=Q_HEADS, Hkv=8, D=D, P=PREFIX_LEN, dtype="bf16")
            for D in COMPARE_HEAD_DIMS for T in SEQ_LENS]


def cpu_shapes() -> list[Shape]:
    return sweep(CPU_SEQ_LENS, CPU_TOKENS, CPU_HEAD_DIMS, CPU_KV_HEADS, ("fp32",), CPU_Q_HEADS)


def attention_flops(shape: Shape, mode: str, with_prefix: bool = True) -> float:
    """FLOPs as FlashAttention counts them, plus the prefix term."""
    forward = 4.0 * shape.B * shape.Hq * shape.T * shape.S * shape.D * (0.5 if shape.causal else 1.0)
    if with_prefix:
        forward += 4.0 * shape.B * shape.Hq * shape.T * shape.P * shape.D
    return forward * {"fwd": 1.0, "bwd": BACKWARD_FLOPS_RATIO, "fwd+bwd": 1.0 + BACKWARD_FLOPS_RATIO}[mode]


# ----------------------------------------------------------------------------------------
# Inputs and implementations


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    gate: torch.Tensor
    grad_out: torch.Tensor

    def tensors(self, names: Sequence[str]) -> list[torch.Tensor]:
        return [getattr(self, n) for n in names]


ADAPTER_INPUTS = ("q", "k", "v", "prefix_k", "prefix_v", "gate")
PLAIN_INPUTS = ("q", "k", "v")


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs that require grad; a prefix shared by the batch (as the adaption prompt
    is) and non-zero gates of both signs, one per query head, in float32."""
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[shape.dtype]

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, device=device, dtype=dtype).requires_grad_()

    gate = torch.rand(shape.Hq, generator=g, device=device) + 0.25
    gate[::2] *= -1
    return Inputs(
        q=randn(shape.B, shape.Hq, shape.T, shape.D),
        k=randn(shape.B, shape.Hkv, shape.S, shape.D),
        v=randn(shape.B, shape.Hkv, shape.S, shape.D),
        prefix_k=randn(shape.Hkv, shape.P, shape.D),
        prefix_v=randn(shape.Hkv, shape.P, shape.D),
        gate=gate.requires_grad_(),
        grad_out=torch.randn(shape.B, shape.Hq, shape.T, shape.D, generator=g, device=device, dtype=dtype),
    )


def fused_attention(x: Inputs) -> torch.Tensor:
    return gated_prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.gate, causal=True, backend="triton")


def previous_fused_attention(x: Inputs) -> torch.Tensor:
    """The fused op on the kernels' previous structure (see the module's docstring)."""
    with kernel_settings(tma=False, prefix_first=False):
        return gated_prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.gate, causal=True, backend="triton",
                                      deterministic=True)


_FLEX: dict[str, Callable] = {}


def flex_attention(x: Inputs) -> torch.Tensor:
    """Two FlexAttention calls (causal words; the prefix, unmasked) and the gated add. Compiled
    on a GPU (as FlexAttention is meant to run); eager on the CPU, where compiling would take
    longer than the tiny problems it serves there."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    if x.q.device.type == "cuda" and "compiled" not in _FLEX:
        # One binary per shape: past dynamo's default of 8 recompilations it would run
        # FlexAttention eagerly (materialized scores) and time that instead.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _FLEX["compiled"] = torch.compile(flex)
    run = _FLEX.get("compiled", flex) if x.q.device.type == "cuda" else flex
    q, k, v, pk, pv = x.q, x.k, x.v, x.prefix_k, x.prefix_v
    B, H, T = q.shape[:3]
    S = k.shape[2]
    gqa = k.shape[1] != H

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (S - T)

    mask = create_block_mask(causal, None, None, T, S, device=q.device)
    o1 = run(q, k, v, block_mask=mask, enable_gqa=gqa)
    pk, pv = pk.unsqueeze(0).expand(B, *pk.shape), pv.unsqueeze(0).expand(B, *pv.shape)
    o2 = run(q, pk, pv, enable_gqa=gqa)
    return o1 + torch.tanh(x.gate).to(o1.dtype).view(1, H, 1, 1) * o2


def eager_attention(x: Inputs) -> torch.Tensor:
    return gated_prefix_attention(x.q, x.k, x.v, x.prefix_k, x.prefix_v, x.gate, causal=True, backend="eager")


def two_sdpa_attention(x: Inputs, backend=None, prefix_backend="same", repeat_kv: bool = False) -> torch.Tensor:
    """Word attention and prefix attention as two SDPA calls, then out = o1 + tanh(gate) * o2
    in the input dtype, as litgpt's adapter does.

    backend: the SDPA backend of the word call (None lets torch choose); prefix_backend the
    prefix call's ("same", or None for torch's choice). repeat_kv copies the kv heads up to
    the query heads instead of asking SDPA for grouped-query attention.
    """
    q, k, v, pk, pv = x.q, x.k, x.v, x.prefix_k, x.prefix_v
    B, H = q.shape[:2]
    if repeat_kv:
        k, v = harness.repeat_heads(k, H, 1), harness.repeat_heads(v, H, 1)
        pk, pv = harness.repeat_heads(pk, H, 0), harness.repeat_heads(pv, H, 0)
    gqa = {"enable_gqa": True} if k.shape[1] != H else {}
    with harness.sdpa_backend(backend):
        o1 = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    pk, pv = pk.unsqueeze(0).expand(B, *pk.shape), pv.unsqueeze(0).expand(B, *pv.shape)
    with harness.sdpa_backend(backend if prefix_backend == "same" else prefix_backend):
        o2 = F.scaled_dot_product_attention(q, pk, pv, **gqa)
    return o1 + torch.tanh(x.gate).to(o1.dtype).view(1, H, 1, 1) * o2


def sdpa_floor(x: Inputs, backend=None, repeat_kv: bool = False) -> torch.Tensor:
    """Plain causal attention without prefix: the cost of the attention alone."""
    q, k, v = x.q, x.k, x.v
    H = q.shape[1]
    if repeat_kv:
        k, v = harness.repeat_heads(k, H, 1), harness.repeat_heads(v, H, 1)
    gqa = {"enable_gqa": True} if k.shape[1] != H else {}
    with harness.sdpa_backend(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)


@dataclass
class Variant:
    """One way to run an implementation; a baseline lists several, tried in order until the
    backend accepts one."""

    fn: Callable[[Inputs], torch.Tensor]
    note: str = ""


@dataclass
class Impl:
    name: str  # "fused", "eager", "two-sdpa", "sdpa floor"
    variants: list[Variant]
    sdpa_backend: str = ""
    inputs: tuple[str, ...] = ADAPTER_INPUTS
    with_prefix: bool = True


def default_backend_name(shape: Shape, device: torch.device) -> str:
    """The backend torch picks by itself for this shape (for labelling CPU rows)."""
    return harness.default_sdpa_backend(shape.B, shape.Hq, shape.Hkv, shape.T, shape.S, shape.D, DTYPES[shape.dtype],
                                        device)


def two_sdpa_impl(name: str, backend, gqa: bool) -> Impl:
    variants = [Variant(lambda x, b=backend: two_sdpa_attention(x, b))]
    if gqa:
        variants.append(Variant(lambda x, b=backend: two_sdpa_attention(x, b, repeat_kv=True),
                                f"kv heads repeated: {name} refused enable_gqa"))
    if backend is not None:
        variants.append(Variant(lambda x, b=backend: two_sdpa_attention(x, b, prefix_backend=None),
                                f"prefix call on torch's default backend: {name} refused it"))
        if gqa:
            variants.append(Variant(
                lambda x, b=backend: two_sdpa_attention(x, b, prefix_backend=None, repeat_kv=True),
                f"kv heads repeated and prefix call on torch's default backend: {name} refused both"))
    return Impl("two-sdpa", variants, sdpa_backend=name)


def floor_impl(name: str, backend, gqa: bool) -> Impl:
    variants = [Variant(lambda x, b=backend: sdpa_floor(x, b))]
    if gqa:
        variants.append(Variant(lambda x, b=backend: sdpa_floor(x, b, repeat_kv=True),
                                f"kv heads repeated: {name} refused enable_gqa"))
    return Impl("sdpa floor", variants, sdpa_backend=name, inputs=PLAIN_INPUTS, with_prefix=False)


# ----------------------------------------------------------------------------------------
# Correctness check


def _output_and_grads(fn: Callable[[Inputs], torch.Tensor], x: Inputs) -> tuple[torch.Tensor, list]:
    inputs = x.tensors(ADAPTER_INPUTS)
    out = fn(x)
    grads = torch.autograd.grad(out, inputs, x.grad_out, allow_unused=True)
    return out.detach(), [g.detach() if g is not None else None for g in grads]


def check_fused(x: Inputs, device: torch.device) -> dict:
    """Compare the fused output and gradients with SDPA in higher precision.

    The criterion is FlashAttention's: the fused error may be at most twice the error of
    SDPA run in the same low precision, plus a small absolute floor. The SDPA runs repeat
    the kv heads rather than ask for grouped-query attention, so that torch never falls
    back to its materializing math kernel (which would not fit at T = 16k). Raises when the
    fused op fails; returns ok=None when the reference does not fit in memory.
    """
    out_fused, grads_fused = _output_and_grads(fused_attention, x)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    try:
        ref_inputs = Inputs(*[t.detach().to(ref_dtype).requires_grad_(t.requires_grad) for t in
                              x.tensors((*ADAPTER_INPUTS, "grad_out"))])
        out_ref, grads_ref = _output_and_grads(lambda i: two_sdpa_attention(i, repeat_kv=True), ref_inputs)
        del ref_inputs
        out_low, grads_low = _output_and_grads(lambda i: two_sdpa_attention(i, repeat_kv=True), x)
    except RuntimeError as exc:
        if not harness.is_out_of_memory(exc):
            raise
        return {"ok": None, "out_err": None, "grad_err": None,
                "note": "not checked: the float32 SDPA reference ran out of memory"}
    out_err = harness.relative_error(out_fused, out_ref)
    out_err_low = harness.relative_error(out_low, out_ref)
    grad_errs = [harness.relative_error(g, r) for g, r in zip(grads_fused, grads_ref, strict=True)]
    grad_errs_low = [harness.relative_error(g, r) for g, r in zip(grads_low, grads_ref, strict=True)]
    ok = out_err <= 2 * out_err_low + 1e-3 and all(
        e <= 2 * e_low + 1e-2 for e, e_low in zip(grad_errs, grad_errs_low, strict=True)
    )
    worst = max(range(len(grad_errs)), key=lambda i: grad_errs[i] / (2 * grad_errs_low[i] + 1e-2))
    note = "" if ok else (f"MISMATCH against SDPA: output error {out_err:.2e} (SDPA low precision "
                          f"{out_err_low:.2e}), d{ADAPTER_INPUTS[worst]} error {grad_errs[worst]:.2e} "
                          f"(SDPA {grad_errs_low[worst]:.2e})")
    return {"ok": ok, "out_err": out_err, "grad_err": max(grad_errs), "note": note}


# ----------------------------------------------------------------------------------------
# Measuring


def measure_impl(impl: Impl, x: Inputs, device: torch.device, timer) -> tuple[dict, str]:
    """Time one implementation on one shape in the three modes (see harness.measure_variants)."""
    variants = [(lambda fn=v.fn: fn(x), v.note) for v in impl.variants]
    return harness.measure_variants(variants, tuple(x.tensors(impl.inputs)), x.grad_out, device, timer)


def _rows(impl: Impl, shape: Shape, results: dict, base: dict, status: str = "", note: str = "",
          tuning: str = "", check: dict | None = None) -> list[dict]:
    rows = []
    for mode in MODES:
        result = results.get(mode) or {"timing": None, "status": status or "skipped"}
        timing = result["timing"]
        row = {
            **base, **asdict(shape), "S": shape.S, "impl": impl.name, "sdpa_backend": impl.sdpa_backend,
            "tuning": tuning, "mode": mode,
            "ms": timing.ms if timing else None, "ms_p20": timing.p20 if timing else None,
            "ms_p80": timing.p80 if timing else None,
            "tflops": attention_flops(shape, mode, impl.with_prefix) / (timing.ms * 1e-3) / 1e12 if timing else None,
            "peak_mem_mib": results.get("peak") if mode == "fwd+bwd" else None,
            "status": status if status and result["status"] == "ok" else result["status"],
            "note": note,
        }
        if check is not None:
            row["out_err"], row["grad_err"] = check["out_err"], check["grad_err"]
        rows.append(row)
    return rows


def bench_shape(shape: Shape, device: torch.device, timer, impl_names: Sequence[str], backends: dict,
                base: dict, check: bool = True) -> list[dict]:
    """All rows of one shape: the correctness check, then every implementation."""
    x = make_inputs(shape, device)
    gqa = shape.Hkv != shape.Hq
    rows: list[dict] = []
    fastest: tuple[float, str] | None = None

    def run(impl: Impl, tuning: str = "", check_result: dict | None = None) -> None:
        nonlocal fastest
        status = "mismatch" if check_result is not None and check_result["ok"] is False else ""
        try:
            results, note = measure_impl(impl, x, device, timer)
        except harness.Refused as exc:
            # A baseline that a backend refuses is unsupported there; the fused op must run.
            refused = "unsupported" if impl.name in ("two-sdpa", "flex", "sdpa floor") else "error"
            rows.extend(_rows(impl, shape, {}, base, refused, str(exc), tuning, check_result))
            return
        except Exception as exc:  # a failing implementation must not stop the sweep
            harness.release_memory()
            rows.extend(_rows(impl, shape, {}, base, "error", f"{type(exc).__name__}: {harness.first_line(str(exc))}",
                              tuning, check_result))
            return
        if check_result and check_result["note"]:
            note = "; ".join(n for n in (check_result["note"], note) if n)
        rows.extend(_rows(impl, shape, results, base, status, note, tuning, check_result))
        both = results.get("fwd+bwd") or {}
        if impl.name == "two-sdpa" and both.get("timing"):
            if fastest is None or both["timing"].ms < fastest[0]:
                fastest = (both["timing"].ms, impl.sdpa_backend)

    tuning = {True: "autotuned", False: "fixed config", None: ""}[harness.autotuning_enabled()]
    if "fused" in impl_names:
        try:
            check_result = check_fused(x, device) if check else None
        except Exception as exc:
            harness.release_memory()
            rows.extend(_rows(Impl("fused", []), shape, {}, base, "error",
                              f"{type(exc).__name__}: {harness.first_line(str(exc))}", tuning))
            check_result = False
        if check_result is not False:
            run(Impl("fused", [Variant(fused_attention)]), tuning, check_result)
    if "fused-previous" in impl_names:
        run(Impl("fused-previous", [Variant(previous_fused_attention)]), tuning)
    if "eager" in impl_names:
        run(Impl("eager", [Variant(eager_attention)]))
    if "flex" in impl_names:
        run(Impl("flex", [Variant(flex_attention)]))
    if "two-sdpa" in impl_names:
        for name, backend in backends.items():
            label = name if backend is not None else default_backend_name(shape, device)
            run(two_sdpa_impl(label, backend, gqa))
    if "floor" in impl_names and backends:
        name = fastest[1] if fastest else next(iter(backends))
        backend = backends.get(name)
        label = name if backend is not None else default_backend_name(shape, device)
        run(floor_impl(label, backend, gqa))
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """Each timed row's speedup over the best baseline of its mode (rows of one shape)."""
    for mode in MODES:
        times = [r["ms"] for r in rows if r["mode"] == mode and r["impl"] in BASELINES and r["ms"] is not None]
        for r in rows:
            if r["mode"] == mode:
                r["speedup_vs_best"] = min(times) / r["ms"] if times and r["ms"] else None


def skipped_rows(shape: Shape, impl_names: Sequence[str], base: dict, reason: str) -> list[dict]:
    return _rows(Impl(",".join(impl_names), []), shape, {}, base, "skipped", reason)


def compile_shape(shape: Shape, device: torch.device, config_shard: tuple[int, int]) -> None:
    """Compile every autotuning candidate of the fused kernels for this shape, without
    running them (fills Triton's cache for a later timing run)."""
    x = make_inputs(shape, device)
    harness.reset_autotuning()
    with harness.compile_only(config_shard):
        for fused in (fused_attention, previous_fused_attention):
            torch.autograd.grad(fused(x), x.tensors(ADAPTER_INPUTS), x.grad_out)
    harness.synchronize(device)


# ----------------------------------------------------------------------------------------
# Command line


def select_shapes(args: argparse.Namespace, device: torch.device) -> list[Shape]:
    if args.preset == "targets":
        shapes = target_shapes()
    elif args.preset == "compare":
        shapes = compare_shapes()
    elif args.preset == "cpu":
        shapes = cpu_shapes()
    else:
        shapes = sweep()
    if args.seq_lens or args.head_dims or args.kv_heads or args.dtypes or args.tokens:
        base = shapes[0] if shapes else Shape(1, 1, Q_HEADS, 8, 128, PREFIX_LEN, "bf16")
        shapes = sweep(
            args.seq_lens or sorted({s.T for s in shapes}),
            args.tokens or base.B * base.T,
            args.head_dims or list(dict.fromkeys(s.D for s in shapes)),
            args.kv_heads or list(dict.fromkeys(s.Hkv for s in shapes)),
            args.dtypes or list(dict.fromkeys(s.dtype for s in shapes)),
            base.Hq,
            base.P,
        )
    if args.part == "headline":
        shapes = [s for s in shapes if s.headline]
    elif args.part == "rest":
        shapes = [s for s in shapes if not s.headline]
    index, count = harness.parse_shard(args.shard)
    return shapes[index::count]


def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", choices=("gpu", "targets", "compare", "cpu"), default=None,
                   help="gpu: the full sweep; targets: the speed-target shapes; compare: the first contact's (bf16, "
                        "D 128 then 64, T 256 to 16k); cpu: small problems, SDPA against eager (default: gpu with "
                        "CUDA, else cpu)")
    p.add_argument("--part", choices=("all", "headline", "rest"), default="all",
                   help="headline: bf16 with D = 128 only; rest: everything else")
    p.add_argument("--seq-lens", type=_int_list, help="override T, e.g. 512,2048")
    p.add_argument("--tokens", type=int, help="override B * T")
    p.add_argument("--head-dims", type=_int_list)
    p.add_argument("--kv-heads", type=_int_list)
    p.add_argument("--dtypes", type=_str_list, help="bf16, fp16, fp32")
    p.add_argument("--impls", type=_str_list, default=None,
                   help="fused, fused-previous, eager, two-sdpa, flex, floor (default: all on a GPU; eager, "
                        "two-sdpa and floor on the CPU)")
    p.add_argument("--sdpa-backends", type=_str_list, default=["flash", "cudnn", "efficient"],
                   help="SDPA backends for the two-sdpa rows on a GPU")
    p.add_argument("--csv", type=Path, help="output file (default: benchmarks/results/<device>-<date>-attention.csv)")
    p.add_argument("--device", default=None)
    p.add_argument("--shard", default="0/1", help="i/n: only every n-th shape from the i-th")
    p.add_argument("--compile-only", action="store_true",
                   help="compile the fused kernels for the shapes without timing anything")
    p.add_argument("--config-shard", default="0/1", help="with --compile-only: i/n of the autotuning candidates")
    p.add_argument("--deadline", type=float, help="time.time() after which no new shape starts")
    p.add_argument("--budget-s", type=float, help="seconds after which no new shape starts")
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=50.0)
    p.add_argument("--tune-rep-ms", type=float, default=25.0,
                   help="time per autotuning candidate (0: Triton's default of 100 ms)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per measurement on the CPU")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check of the fused output")
    p.add_argument("--list", action="store_true", help="print the selected shapes and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else harness.default_device()
    args.preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    shapes = select_shapes(args, device)
    if args.list:
        for shape in shapes:
            print(shape.describe() + f" P={shape.P} causal={shape.causal}")
        return []
    env = harness.environment(device)
    if args.compile_only:
        return _compile_main(args, shapes, device)

    # FlexAttention has no backward on the CPU: there it is timed only when asked for.
    impl_names = args.impls or (["fused", "fused-previous", "eager", "two-sdpa", "flex", "floor"]
                                if device.type == "cuda" else ["eager", "two-sdpa", "floor"])
    if device.type != "cuda" and "fused" not in impl_names:
        print("Kernel timings need a GPU: the fused Triton kernels are not timed on the CPU.")
    if device.type == "cuda":
        backends = harness.available_sdpa_backends(args.sdpa_backends, device, torch.bfloat16)
        missing = [b for b in args.sdpa_backends if b not in backends]
        if missing:
            print(f"SDPA backends not available here: {', '.join(missing)}")
        timer = harness.CudaTimer(args.warmup_ms, args.rep_ms)
    else:
        backends = {"default": None}
        timer = harness.CpuTimer(args.repeats)
    if "fused" in impl_names and args.tune_rep_ms > 0:
        import llama_adapter_fast.ops.custom_ops  # noqa: F401  (loads the kernels and their autotuners)

        harness.shorten_autotuning(min(args.tune_rep_ms / 5, args.warmup_ms), args.tune_rep_ms)

    csv_path = args.csv or harness.RESULTS_DIR / f"{harness.run_stem(env)}-attention.csv"
    deadline = harness.Deadline(args.deadline) if args.deadline else harness.Deadline.after(args.budget_s)
    base = {**env, "bench": "attention"}
    print(f"attention benchmark on {harness.format_environment(env)}: {len(shapes)} shapes, "
          f"{', '.join(impl_names)}; SDPA backends {', '.join(backends)}")
    rows: list[dict] = []
    for shape in harness.progress(shapes, "attention shapes"):
        if deadline.passed():
            rows.extend(skipped_rows(shape, impl_names, base, "time budget spent"))
            continue
        start = time.time()
        shape_rows = bench_shape(shape, device, timer, impl_names, backends, base, check=not args.no_check)
        harness.release_memory(collect=False)  # the shape's inputs are gone: hand their memory back
        rows.extend(shape_rows)
        harness.log(f"  {shape.describe()}: {describe_rows(shape_rows)}  [{time.time() - start:.1f} s]")
        harness.write_csv(csv_path, rows, COLUMNS)
    harness.write_csv(csv_path, rows, COLUMNS)
    skipped = sum(1 for r in rows if r["status"] == "skipped" and r["mode"] == "fwd")
    if skipped:
        print(f"{skipped} shapes skipped: the time budget was spent")
    print(f"wrote {csv_path}")
    return rows


def describe_rows(rows: Sequence[dict]) -> str:
    """One line: the forward+backward time of each implementation, or why it has none."""
    parts = []
    for row in rows:
        if row["mode"] != "fwd+bwd":
            continue
        label = row["impl"] + (f"[{row['sdpa_backend']}]" if row["sdpa_backend"] else "")
        value = f"{row['ms']:.3g} ms" if row["ms"] is not None else row["status"]
        if row["status"] == "mismatch":
            value += " MISMATCH"
        parts.append(f"{label} {value}")
    return ", ".join(parts)


def _compile_main(args: argparse.Namespace, shapes: Sequence[Shape], device: torch.device) -> list[dict]:
    import llama_adapter_fast.ops.custom_ops  # noqa: F401  (loads the kernels)

    config_shard = harness.parse_shard(args.config_shard)
    deadline = harness.Deadline(args.deadline) if args.deadline else harness.Deadline.after(args.budget_s)
    for shape in shapes:
        if deadline.passed():
            print(f"compile: time budget spent before {shape.describe()}", flush=True)
            break
        start = time.time()
        try:
            compile_shape(shape, device, config_shard)
        except Exception as exc:  # report and go on: the timing run will show the failure too
            print(f"compile: {shape.describe()} failed: {type(exc).__name__}: {harness.first_line(str(exc))}",
                  flush=True)
            harness.release_memory()
            continue
        print(f"compiled {shape.describe()} (candidates {args.config_shard}) in {time.time() - start:.1f} s",
              flush=True)
    return []


if __name__ == "__main__":
    main(sys.argv[1:])
