"""Compile every kernel config the launchers can pick for NVIDIA GPUs, on a machine without one.

    python -m benchmarks.compile_report                 # the full sweep (sm_90 and sm_80)
    python -m benchmarks.compile_report --quick --check # sm_90, bf16, head dims 64, 128, 256, causal

Triton ships ptxas, so a kernel compiles for a real H100 or A100 without a driver. The
launchers of the package run on CPU tensors under `capture_launches()`, which records
each launch (kernel, arguments, constexprs) instead of running it; every candidate config
of that kernel is then compiled for each architecture with exactly those arguments, as the
launcher's own call would compile it on the card. For each it reports:

- shared memory (the compiled kernel's) and whether the config can be picked: the
  launcher keeps the candidates whose binaries fit the architecture's shared memory, by
  the same function (`configs.fitting`), and uses the first when autotuning is off;
- registers per thread, stack frame and spill bytes (ptxas -v);
- the matrix instruction in the PTX: wgmma (Hopper's warpgroup MMA), mma (mma.sync) or
  none (FMA loops);
- the launch grid.

Results go to benchmarks/results/compile-report-<date>.csv and a markdown table beside it.
With --check the exit status is 1 when no candidate of a launch fits its architecture's
shared memory, when a config that can be picked does not fit, when a config fails to
compile, or when a grid dimension is over CUDA's limits; --spill-targets adds the spill
targets of 16-bit kernels on sm_90 (no pickable config spills at head dims 64 to 128, and
at 256 each kernel has a spill-free pickable config that uses wgmma), in the padded modes
(causal, causal-padded, bidirectional); the packed mode's spills are reported only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import io
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter replaces @triton.jit functions at import time: nothing to compile.
    os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARCH_NAMES = {80: "sm_80", 90: "sm_90"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MODES = ("causal", "causal-padded", "bidirectional", "packed")
HEAD_DIMS = (64, 80, 96, 128, 256)
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Row:
    arch: str
    dtype: str
    head_dim: int
    mode: str
    kernel: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    default: bool
    pickable: bool
    shared_bytes: int
    shared_limit: int
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    mma: str
    grid: str
    compile_s: float
    error: str = ""

    def problems(self) -> list[str]:
        found = []
        if self.error:
            return [self.error]
        if self.pickable and self.shared_bytes > self.shared_limit:
            found.append(f"needs {self.shared_bytes} B of shared memory, the limit is {self.shared_limit}")
        dims = [int(x) for x in self.grid.split("x")]
        if any(d > limit for d, limit in zip(dims, GRID_LIMITS, strict=False)):
            found.append(f"grid {self.grid} over CUDA's limits")
        return found

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0

    def label(self) -> str:
        return f"{self.kernel} M{self.block_m} N{self.block_n} w{self.num_warps} s{self.num_stages}"


@dataclass
class Problem:
    B: int = 2
    Hq: int = 32
    Hkv: int = 8
    T: int = 1024
    P: int = 10


def captured_launches(dtype: torch.dtype, head_dim: int, mode: str, problem: Problem) -> list:
    """The launches of one forward and one backward, made by the package's launchers on
    CPU tensors (nothing runs)."""
    from llama_adapter_fast.kernels import backward as bwd
    from llama_adapter_fast.kernels import forward as fwd
    from llama_adapter_fast.kernels.configs import capture_launches

    p = problem
    q = torch.empty(p.B, p.Hq, p.T, head_dim, dtype=dtype)
    k = torch.empty(p.B, p.Hkv, p.T, head_dim, dtype=dtype)
    v = torch.empty_like(k)
    pk = torch.empty(p.Hkv, p.P, head_dim, dtype=dtype)
    pv = torch.empty_like(pk)
    gate = torch.zeros(p.Hq)
    mask = torch.ones(p.B, p.T, dtype=torch.bool) if mode == "causal-padded" else None
    causal = mode != "bidirectional"
    scale = head_dim**-0.5
    if mode == "packed":  # the B sequences end to end, causal (the kernels' VARLEN specialization)
        q, k, v = (x.transpose(1, 2).reshape(p.B * p.T, x.shape[1], head_dim) for x in (q, k, v))
        cu = torch.arange(0, p.B * p.T + 1, p.T, dtype=torch.int32)
        with capture_launches() as launches:
            out, lse1, lse2 = fwd.varlen_forward(q, k, v, pk, pv, gate, cu, cu, p.T, p.T, True, scale)
            bwd.varlen_backward(torch.empty_like(out), q, k, v, pk, pv, gate, cu, cu, p.T, p.T, out, lse1, lse2,
                                True, scale)
        return launches
    with capture_launches() as launches:
        out, lse1, lse2 = fwd.forward(q, k, v, pk, pv, gate, mask, causal, scale)
        bwd.backward(torch.empty_like(out), q, k, v, pk, pv, gate, mask, out, lse1, lse2, causal, scale)
    return launches


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def _ptxas_numbers(log: str) -> tuple[int, int, int, int]:
    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return (number(r"Used (\d+) registers"), number(r"(\d+) bytes stack frame"),
            number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"))


def compile_one(launch, candidate, arch: int) -> dict:
    """Compile one launch with one config for one architecture, as JITFunction.run would
    on that card; returns shared memory, ptxas numbers and the MMA kind."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = launch.fn
    kwargs = {**launch.meta, **candidate.kwargs()}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    # Compile even when Triton's cache has the binary, so that ptxas prints its numbers.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    registers, stack, spill_stores, spill_loads = _ptxas_numbers(log.getvalue())
    return dict(shared_bytes=int(kernel.metadata.shared), registers=registers, stack_bytes=stack,
                spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                mma=_mma_kind(kernel.asm["ptx"]), compile_s=time.perf_counter() - start)


def _job(arch: int, dtype_name: str, head_dim: int, mode: str, problem: Problem, kernels: tuple[str, ...]) -> list[Row]:
    """Every candidate of every launch of one (arch, dtype, head dim, mode)."""
    from llama_adapter_fast.kernels.configs import SHARED_MEMORY_LIMIT, candidates, fitting

    dtype = DTYPES[dtype_name]
    limit = SHARED_MEMORY_LIMIT[arch]
    rows = []
    for launch in captured_launches(dtype, head_dim, mode, problem):
        if launch.kernel not in kernels:
            continue
        group = []
        for cand in candidates(launch.kernel, launch.meta["HEAD_DIM"], dtype.itemsize):
            row = dict(arch=ARCH_NAMES.get(arch, f"sm_{arch}"), dtype=dtype_name, head_dim=head_dim, mode=mode,
                       kernel=launch.kernel, block_m=cand.block_m, block_n=cand.block_n,
                       num_warps=cand.num_warps, num_stages=cand.num_stages, default=False, pickable=False,
                       shared_limit=limit, grid="x".join(str(d) for d in launch.grid(cand.kwargs())))
            try:
                row.update(compile_one(launch, cand, arch))
            except Exception as exc:  # a config that does not compile is a finding, not a crash
                row.update(shared_bytes=2**31, registers=0, stack_bytes=0, spill_store_bytes=0,
                           spill_load_bytes=0, mma="", compile_s=0.0,
                           error=f"compile error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            group.append(Row(**row))
        # The launcher's own choice, from the compiled sizes.
        try:
            kept = fitting(launch.kernel, group, lambda r: r.shared_bytes, limit)
        except ValueError as exc:
            kept = []
            for r in group:
                r.error = r.error or str(exc)
        for i, r in enumerate(kept):
            r.pickable, r.default = True, i == 0
        rows.extend(group)
    return rows


def sweep(archs, dtypes, head_dims, modes, problem: Problem, kernels, jobs: int) -> list[Row]:
    tasks = [(a, d, h, m) for a in archs for d in dtypes for h in head_dims for m in modes]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows: list[Row] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_job, *t, problem, kernels) for t in tasks]
        done = concurrent.futures.as_completed(futures)
        if tqdm is not None:
            done = tqdm(done, total=len(futures), desc="compiling", file=sys.stderr, dynamic_ncols=True)
        for future in done:
            rows.extend(future.result())
    order = {k: i for i, k in enumerate(("forward", "backward_dq", "backward_dkdv"))}
    rows.sort(key=lambda r: (r.arch, r.dtype, r.head_dim, MODES.index(r.mode) if r.mode in MODES else 9,
                             order.get(r.kernel, 9), not r.default, r.block_m, r.block_n, r.num_warps, r.num_stages))
    return rows


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "compile_s": f"{r.compile_s:.2f}"})


def read_csv(path: Path) -> list[Row]:
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            values = {}
            for name, text in raw.items():
                kind = types[name]
                if kind == "bool":
                    values[name] = text == "True"
                elif kind == "int":
                    values[name] = int(text)
                elif kind == "float":
                    values[name] = float(text)
                else:
                    values[name] = text
            rows.append(Row(**values))
    return rows


def markdown(rows: list[Row], title: str) -> str:
    """A summary per (arch, dtype, kernel) and the full table of configs."""
    lines = [f"# {title}", ""]
    problems = [(r, p) for r in rows for p in r.problems()]
    problems += [(None, p) for p in spill_target_misses(rows)]
    spilling = [r for r in rows if r.pickable and r.spills]
    lines += [f"{len(rows)} compiles; {len(problems)} problems; {len(spilling)} pickable configs spill.", ""]
    if problems:
        lines += ["## Problems", ""]
        lines += [f"- {r.arch} {r.dtype} d{r.head_dim} {r.mode} {r.label()}: {p}" if r else f"- {p}"
                  for r, p in problems]
        lines.append("")
    lines += ["## Spills of the pickable configs", "",
              "| arch | dtype | kernel | head dims with a spilling config | configs spilling / pickable |",
              "|---|---|---|---|---|"]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.pickable:
            groups.setdefault((r.arch, r.dtype, r.kernel), []).append(r)
    for (arch, dtype, kernel), group in groups.items():
        dims = sorted({r.head_dim for r in group if r.spills})
        lines.append(f"| {arch} | {dtype} | {kernel} | {', '.join(map(str, dims)) or '-'} | "
                     f"{sum(r.spills for r in group)} / {len(group)} |")
    lines += ["", "## Every config", "",
              "| arch | dtype | D | mode | kernel | M | N | warps | stages | default | pickable | shared KB "
              "| regs | stack | spill st/ld | mma |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shared = f"{r.shared_bytes / 1024:.0f}" if not r.error else "-"
        lines.append(
            f"| {r.arch} | {r.dtype} | {r.head_dim} | {r.mode} | {r.kernel} | {r.block_m} | {r.block_n} | "
            f"{r.num_warps} | {r.num_stages} | {'yes' if r.default else ''} | {'yes' if r.pickable else 'no'} | "
            f"{shared} | {r.registers} | {r.stack_bytes} | {r.spill_store_bytes}/{r.spill_load_bytes} | "
            f"{r.mma or r.error} |")
    return "\n".join(lines) + "\n"


def spill_target_misses(rows: list[Row]) -> list[str]:
    """The spill targets of 16-bit kernels on sm_90: no pickable config spills at head dims
    64 to 128; at 256 each kernel has a spill-free pickable config that uses wgmma."""
    misses = []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        # The packed kernels (VARLEN) are compiled and checked for fit, but not yet tuned
        # for spills: the targets are those of the padded modes.
        if r.arch == "sm_90" and r.dtype in ("bf16", "fp16") and r.pickable and r.mode != "packed":
            groups.setdefault((r.dtype, r.head_dim, r.mode, r.kernel), []).append(r)
    for (dtype, head_dim, mode, kernel), group in groups.items():
        if head_dim <= 128:
            misses += [f"sm_90 {dtype} d{head_dim} {mode} {r.label()} spills "
                       f"{r.spill_store_bytes}/{r.spill_load_bytes} B" for r in group if r.spills]
        elif not any(not r.spills and r.mma == "wgmma" for r in group):
            misses.append(f"sm_90 {dtype} d{head_dim} {mode} {kernel}: no spill-free wgmma config")
    return misses


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a quick subset: sm_90, bf16, head dims 64, 128 and 256, causal (make test also checks "
                        "the padded and bidirectional modes, and the spill targets)")
    p.add_argument("--archs", default="90,80", help="compute capabilities, e.g. 90,80")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--kernels", default="forward,backward_dq,backward_dkdv")
    p.add_argument("--batch", type=int, default=Problem.B)
    p.add_argument("--q-heads", type=int, default=Problem.Hq)
    p.add_argument("--kv-heads", type=int, default=Problem.Hkv)
    p.add_argument("--seq-len", type=int, default=Problem.T)
    p.add_argument("--prefix-len", type=int, default=Problem.P)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/compile-report-<date>.csv)")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    p.add_argument("--check", action="store_true", help="exit with status 1 on any problem")
    p.add_argument("--spill-targets", action="store_true", help="with --check, also fail on missed spill targets")
    args = p.parse_args(argv)
    if args.quick:
        args.archs, args.dtypes, args.head_dims, args.modes = "90", "bf16", "64,128,256", "causal"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    problem = Problem(args.batch, args.q_heads, args.kv_heads, args.seq_len, args.prefix_len)
    start = time.perf_counter()
    rows = sweep(archs, args.dtypes.split(","), [int(h) for h in args.head_dims.split(",")],
                 args.modes.split(","), problem, tuple(args.kernels.split(",")), args.jobs)
    import triton

    title = (f"Compile report: B={problem.B}, Hq={problem.Hq}, Hkv={problem.Hkv}, T=S={problem.T}, "
             f"P={problem.P} (triton {triton.__version__}, {datetime.date.today()})")
    table = markdown(rows, title)
    if not args.no_write:
        out = args.out or RESULTS_DIR / f"compile-report-{datetime.date.today()}.csv"
        write_csv(rows, out)
        out.with_suffix(".md").write_text(table, encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.md')}")
    summary = table.split("## Every config")[0]
    print(summary.rstrip())
    print(f"{len(rows)} configs compiled in {time.perf_counter() - start:.0f} s")
    problems = [p for r in rows for p in r.problems()]
    if args.spill_targets:
        problems += spill_target_misses(rows)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
