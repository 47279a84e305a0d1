"""Compile every kernel config the launchers can pick for NVIDIA GPUs, on a machine without one.

    python -m benchmarks.compile_report                 # the full sweep (sm_90 and sm_80, every shape)
    python -m benchmarks.compile_report --quick --check # sm_90, bf16, head dims 64, 128, 256, causal, one shape

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
Every launch is captured on several launch shapes (`SHAPES`): on a GPU, Triton compiles
another binary for an integer argument equal to 1 or divisible by 16, so the shapes put
each integer argument in each of those classes (decoding's T = 1, P = 1, a group of 1,
B = 1, S = 1, odd lengths and head counts). Shapes that compile to the same binary are
compiled once.

With --check the exit status is 1 when no candidate of a launch fits its architecture's
shared memory, when a config that can be picked does not fit, when a config fails to
compile, or when a grid dimension is over CUDA's limits; --spill-targets adds the spill
targets of 16-bit kernels on sm_90: no pickable config spills, at any head dim, in any
mode (causal, causal-padded, bidirectional, packed, and the decode modes), on any shape,
and each kernel has a pickable config that uses wgmma.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import datetime
import hashlib
import io
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter replaces @triton.jit functions at import time: nothing to compile.
    os.environ["TRITON_INTERPRET"] = "0"

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ARCH_NAMES = {80: "sm_80", 90: "sm_90"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# The decode modes: a cache with a length per sequence (gated_prefix_attention_decode), with
# first positions too (a left-padded cache), and a key padding mask without lengths (what
# generation through the op's key_padding_mask runs): each is another binary.
DECODE_MODES = ("decode", "decode-starts", "decode-padded")
MODES = ("causal", "causal-padded", "bidirectional", "packed", *DECODE_MODES)
KERNELS = ("forward", "backward_prefix", "backward", "backward_dq", "backward_dkdv", "decode", "decode_combine")
DECODE_KERNELS = ("decode", "decode_combine")
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Row:
    arch: str
    dtype: str
    head_dim: int
    mode: str
    shape: str
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
    mma_kind: str  # the matrix instruction: wgmma, mma (mma.sync) or none
    grid: str
    compile_s: float
    error: str = ""
    binary: str = ""  # a hash of the compiled binary's source and options: shapes that share it share a row
    # The structure of the binary, counted in its PTX: bulk tensor copies (TMA loads, stores
    # and reduce-adds), per-thread asynchronous copies, warpgroup and warp matrix products.
    tma: int = 0
    cp_async: int = 0
    wgmma: int = 0
    mma: int = 0
    spill_bytes: int = 0  # spill stores + loads
    ctas_per_sm: int = 0  # blocks one multiprocessor holds at once (registers, shared memory, threads)
    # With --structure-targets: the same config with its tiles through pointers (the previous
    # load path), for a binary that uses tensor descriptors; -1: not compiled.
    pointer_ctas_per_sm: int = -1

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


@dataclass(frozen=True)
class Problem:
    B: int = 2
    Hq: int = 32
    Hkv: int = 8
    T: int = 1024
    P: int = 10
    S: int | None = None  # keys per sequence; None: T

    @property
    def seq_k(self) -> int:
        return self.T if self.S is None else self.S

    def describe(self) -> str:
        return f"B={self.B}, Hq={self.Hq}, Hkv={self.Hkv}, T={self.T}, S={self.seq_k}, P={self.P}"


# Launch shapes. On a GPU, Triton compiles another binary for an integer argument equal to 1
# (it becomes a constant) or divisible by 16 (an alignment hint), so the shapes below cover
# every integer argument of the kernels (sizes, head counts, the group, strides such as T * D
# and H * T) in each of those classes, and the combinations that decoding and MHA make.
SHAPES = {
    "base": Problem(),                                         # sizes divisible by 16, a group of 4
    "odd": Problem(B=3, Hq=28, Hkv=4, T=777, P=7),             # nothing divisible by 16, a group of 7
    "decode": Problem(B=1, Hq=32, Hkv=8, T=1, S=777, P=10),    # one new query over an odd cache
    "chunk": Problem(B=4, Hq=32, Hkv=8, T=5, S=1024, P=10),    # a few new queries (speculative decoding)
    "mha-decode": Problem(B=1, Hq=8, Hkv=8, T=1, S=1024, P=1),  # T = P = B = group = 1
    "mqa": Problem(B=2, Hq=32, Hkv=1, T=512, P=16),            # one kv head, a prefix of 16
    "ones": Problem(B=1, Hq=1, Hkv=1, T=1, S=1, P=1),          # every size 1
}

# The decode mode's shapes (kernels/decode.py: a few new queries over a cache with a length
# per sequence). Each row block the launcher can pick (query heads of a group x queries:
# 4, 1, 40, 28 and 128 rows) and the same classes of integer arguments as above.
DECODE_SHAPES = {
    "decode": Problem(B=1, Hq=32, Hkv=8, T=1, S=777, P=10),    # a group of 4, one query: 4 rows
    "mha-decode": Problem(B=1, Hq=8, Hkv=8, T=1, S=1024, P=1),  # T = P = B = group = 1
    "chunk": Problem(B=4, Hq=32, Hkv=4, T=5, S=1024, P=10),    # 40 rows
    "mqa": Problem(B=3, Hq=28, Hkv=1, T=1, S=4096, P=7),       # 28 rows
    "group8-chunk16": Problem(B=2, Hq=32, Hkv=4, T=16, S=600, P=64),  # 128 rows, several row blocks
    "ones": Problem(B=1, Hq=1, Hkv=1, T=1, S=1, P=1),
}


def shapes_of(mode: str, shapes: dict[str, Problem]) -> dict[str, Problem]:
    """The launch shapes of a mode: the decode mode's own unless custom shapes were given."""
    if mode not in DECODE_MODES or any(name not in SHAPES for name in shapes):
        return shapes
    return DECODE_SHAPES


@contextlib.contextmanager
def assumed_arch(arch: int):
    """The launchers choose as they would on a GPU of this architecture (the bulk-copy path
    from sm_90)."""
    from llama_adapter_fast.kernels.utils import ASSUMED_ARCH

    saved, ASSUMED_ARCH[0] = ASSUMED_ARCH[0], arch
    try:
        yield
    finally:
        ASSUMED_ARCH[0] = saved


def captured_launches(dtype: torch.dtype, head_dim: int, mode: str, problem: Problem, arch: int = 90) -> list:
    """The launches of one forward and one backward of each kind (fused and deterministic),
    made by the package's launchers on CPU tensors for a GPU of this architecture (nothing
    runs)."""
    with assumed_arch(arch):
        return _captured_launches(dtype, head_dim, mode, problem)


def _captured_launches(dtype: torch.dtype, head_dim: int, mode: str, problem: Problem) -> list:
    from llama_adapter_fast.kernels import backward as bwd
    from llama_adapter_fast.kernels import forward as fwd
    from llama_adapter_fast.kernels.configs import capture_launches

    p = problem
    S = p.seq_k
    if mode in DECODE_MODES:
        return _decode_launches(dtype, head_dim, p, mode)
    q = torch.empty(p.B, p.Hq, p.T, head_dim, dtype=dtype)
    k = torch.empty(p.B, p.Hkv, S, head_dim, dtype=dtype)
    v = torch.empty_like(k)
    pk = torch.empty(p.Hkv, p.P, head_dim, dtype=dtype)
    pv = torch.empty_like(pk)
    gate = torch.zeros(p.B * p.Hq)  # act(gate) of each sequence and head, as the kernels take it
    mask = torch.ones(p.B, S, dtype=torch.bool) if mode == "causal-padded" else None
    causal = mode != "bidirectional"
    scale = head_dim**-0.5
    if mode == "packed":  # the B sequences end to end, causal (the kernels' VARLEN specialization)
        q, k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], head_dim) for x in (q, k, v))
        cu_q = torch.arange(0, p.B * p.T + 1, p.T, dtype=torch.int32)
        cu_k = torch.arange(0, p.B * S + 1, S, dtype=torch.int32)
        with capture_launches() as launches:
            out, lse1, lse2 = fwd.varlen_forward(q, k, v, pk, pv, gate, cu_q, cu_k, p.T, S, True, scale)
            for deterministic in (False, True):
                bwd.varlen_backward(torch.empty_like(out), q, k, v, pk, pv, gate, cu_q, cu_k, p.T, S, out, lse1,
                                    lse2, True, scale, deterministic)
        return launches
    with capture_launches() as launches:
        out, lse1, lse2 = fwd.forward(q, k, v, pk, pv, gate, mask, causal, scale)
        for deterministic in (False, True):
            bwd.backward(torch.empty_like(out), q, k, v, pk, pv, gate, mask, out, lse1, lse2, causal, scale,
                         deterministic)
    return launches


def _decode_launches(dtype: torch.dtype, head_dim: int, p: Problem, mode: str) -> list:
    """The decode kernels' launches, a shared prefix: a preallocated cache twice the
    problem's keys with a length per sequence ("decode"), and first positions ("decode-
    starts"); or the problem's keys with a key padding mask and no lengths ("decode-padded")."""
    from llama_adapter_fast.kernels.configs import capture_launches
    from llama_adapter_fast.kernels.decode import decode_forward

    q = torch.empty(p.B, p.Hq, p.T, head_dim, dtype=dtype)
    k = torch.empty(p.B, p.Hkv, 2 * p.seq_k, head_dim, dtype=dtype)
    pk = torch.empty(p.Hkv, p.P, head_dim, dtype=dtype)
    lengths = torch.full((p.B,), p.seq_k, dtype=torch.int32)
    starts = torch.zeros(p.B, dtype=torch.int32) if mode == "decode-starts" else None
    mask = None
    if mode == "decode-padded":
        k, lengths, mask = k[:, :, :p.seq_k], None, torch.ones(p.B, p.seq_k, dtype=torch.bool)
    with capture_launches() as launches:
        decode_forward(q, k, torch.empty_like(k), pk, torch.empty_like(pk), torch.zeros(p.B * p.Hq), mask, lengths,
                       starts, True, head_dim**-0.5, max_length=p.seq_k, sm_count=132)  # an H100's
    return launches


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma"
    return "none"


def structure_counts(ptx: str) -> dict[str, int]:
    """Instructions of a binary's PTX that show its structure (static counts)."""
    return dict(tma=len(re.findall(r"\bcp(?:\.reduce)?\.async\.bulk\.tensor", ptx)),
                cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
                wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                mma=len(re.findall(r"\bmma\.sync\b", ptx)))


# Per multiprocessor (CUDA's occupancy rules): registers, shared memory (with 1 KB reserved
# per block), threads and blocks.
SM_LIMITS = {90: dict(registers=65536, shared=233472, threads=2048, blocks=32),
             80: dict(registers=65536, shared=167936, threads=2048, blocks=32)}


def ctas_per_sm(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """How many blocks of a binary one multiprocessor runs at once."""
    limits = SM_LIMITS[arch]
    # Registers are allocated per warp in units of 256.
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = limits["registers"] // (per_warp * num_warps)
    by_shared = limits["shared"] // (shared + 1024)
    by_threads = limits["threads"] // (32 * num_warps)
    return max(0, min(by_registers, by_shared, by_threads, limits["blocks"]))


def _ptxas_numbers(log: str) -> tuple[int, int, int, int]:
    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return (number(r"Used (\d+) registers"), number(r"(\d+) bytes stack frame"),
            number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads"))


# Results by binary (within one process): shapes of the same specialization compile to the
# same binary, which is compiled once.
_COMPILED: dict[str, dict] = {}


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
    source = ASTSource(fn, signature, constexprs, attrs)
    key = f"{source.hash()}-{options.hash()}-{arch}"
    if key in _COMPILED:
        return dict(_COMPILED[key], compile_s=0.0)
    binary = hashlib.sha256(key.encode()).hexdigest()[:12]
    # Compile even when Triton's cache has the binary, so that ptxas prints its numbers.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(source, target=target, options=options.__dict__)
    registers, stack, spill_stores, spill_loads = _ptxas_numbers(log.getvalue())
    shared = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    _COMPILED[key] = dict(shared_bytes=shared, registers=registers, stack_bytes=stack,
                          spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                          spill_bytes=spill_stores + spill_loads, mma_kind=_mma_kind(ptx), binary=binary,
                          ctas_per_sm=ctas_per_sm(arch, registers, shared, candidate.num_warps),
                          **structure_counts(ptx))
    return dict(_COMPILED[key], compile_s=time.perf_counter() - start)


def _job(arch: int, dtype_name: str, head_dim: int, mode: str, shapes: dict[str, Problem],
         kernels: tuple[str, ...], compare_pointers: bool = False) -> list[Row]:
    """Every candidate of every launch of one (arch, dtype, head dim, mode), on each shape."""
    rows = []
    for name, problem in shapes_of(mode, shapes).items():
        rows += _shape_rows(arch, dtype_name, head_dim, mode, name, problem, kernels, compare_pointers)
    return rows


def _pointer_ctas(launch, candidate, arch: int) -> int:
    """CTAs per multiprocessor of the same launch and config with its tiles read through pointers."""
    pointers = replace(launch, meta={**launch.meta, "TMA": False,
                                     **({"DQ_DESC_ADD": False} if "DQ_DESC_ADD" in launch.meta else {})})
    return compile_one(pointers, candidate, arch)["ctas_per_sm"]


def _shape_rows(arch: int, dtype_name: str, head_dim: int, mode: str, shape: str, problem: Problem,
                kernels: tuple[str, ...], compare_pointers: bool = False) -> list[Row]:
    from llama_adapter_fast.kernels.configs import SHARED_MEMORY_LIMIT, fitting

    dtype = DTYPES[dtype_name]
    limit = SHARED_MEMORY_LIMIT[arch]
    rows = []
    for launch in captured_launches(dtype, head_dim, mode, problem, arch):
        if launch.kernel not in kernels:
            continue
        group = []
        for cand in launch.candidates(dtype.itemsize):
            row = dict(arch=ARCH_NAMES.get(arch, f"sm_{arch}"), dtype=dtype_name, head_dim=head_dim, mode=mode,
                       shape=shape, kernel=launch.kernel, block_m=cand.block_m, block_n=cand.block_n,
                       num_warps=cand.num_warps, num_stages=cand.num_stages, default=False, pickable=False,
                       shared_limit=limit, grid="x".join(str(d) for d in launch.grid(cand.kwargs())))
            try:
                row.update(compile_one(launch, cand, arch))
                if compare_pointers and launch.meta.get("TMA"):
                    row["pointer_ctas_per_sm"] = _pointer_ctas(launch, cand, arch)
            except Exception as exc:  # a config that does not compile is a finding, not a crash
                row.update(shared_bytes=2**31, registers=0, stack_bytes=0, spill_store_bytes=0,
                           spill_load_bytes=0, mma_kind="", compile_s=0.0,
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


def sweep(archs, dtypes, head_dims, modes, shapes: dict[str, Problem], kernels, jobs: int,
          compare_pointers: bool = False) -> list[Row]:
    tasks = [(a, d, h, m) for a in archs for d in dtypes for h in head_dims for m in modes]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    rows: list[Row] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_job, *t, shapes, kernels, compare_pointers) for t in tasks]
        done = concurrent.futures.as_completed(futures)
        if tqdm is not None:
            done = tqdm(done, total=len(futures), desc="compiling", file=sys.stderr, dynamic_ncols=True)
        for future in done:
            rows.extend(future.result())
    rows = merge_shapes(rows, shapes)
    order = {k: i for i, k in enumerate(KERNELS)}
    shape_order = {name: i for i, name in enumerate({**shapes, **DECODE_SHAPES})}
    rows.sort(key=lambda r: (r.arch, r.dtype, r.head_dim, MODES.index(r.mode) if r.mode in MODES else 9,
                             shape_order.get(r.shape, 99), order.get(r.kernel, 9), not r.default, r.block_m,
                             r.block_n, r.num_warps, r.num_stages))
    return rows


def merge_shapes(rows: list[Row], shapes: dict[str, Problem]) -> list[Row]:
    """One row per binary: the shapes that compile a config to the same binary share its row
    (named together, or "all" of its mode's shapes), with the largest of their grids."""
    merged: dict[tuple, list[Row]] = {}
    for r in rows:
        same = r.binary or f"{r.shape}-{id(r)}"  # a row without a binary (an error) stays alone
        merged.setdefault((r.arch, r.dtype, r.head_dim, r.mode, r.kernel, r.block_m, r.block_n, r.num_warps,
                           r.num_stages, same), []).append(r)
    out = []
    for group in merged.values():
        names = [r.shape for r in group]
        grid = max((r.grid for r in group), key=_grid_size)
        mode_shapes = list(shapes_of(group[0].mode, shapes))
        out.append(replace(group[0], shape="all" if sorted(names) == sorted(mode_shapes) and len(mode_shapes) > 1
                           else "+".join(names), grid=grid, compile_s=sum(r.compile_s for r in group),
                           default=any(r.default for r in group), pickable=any(r.pickable for r in group)))
    return out


def _grid_size(grid: str) -> int:
    product = 1
    for d in grid.split("x"):
        product *= int(d)
    return product


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(Row)])
        writer.writeheader()
        for r in rows:
            writer.writerow({**asdict(r), "compile_s": f"{r.compile_s:.2f}"})


def read_csv(path: Path) -> list[Row]:
    """The rows of a report's CSV; a report from before the structure columns reads with
    those at their defaults (its `mma` column held the kind, now `mma_kind`)."""
    types = {f.name: f.type for f in fields(Row)}
    rows = []
    with open(path, encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            values = {}
            if "mma_kind" not in raw and "mma" in raw:
                raw["mma_kind"] = raw.pop("mma")
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


def markdown(rows: list[Row], title: str, shapes: dict[str, Problem]) -> str:
    """A summary per (arch, dtype, kernel) and the full table of configs."""
    described = "; ".join(f"{name} ({p.describe()})" for name, p in shapes.items())
    if any(r.mode in DECODE_MODES for r in rows):
        described += "; decode mode: " + "; ".join(f"{name} ({p.describe()})"
                                                   for name, p in shapes_of("decode", shapes).items())
    lines = [f"# {title}", "", f"Launch shapes: {described}", ""]
    problems = [(r, p) for r in rows for p in r.problems()]
    problems += [(None, p) for p in spill_target_misses(rows) + structure_target_misses(rows)]
    spilling = [r for r in rows if r.pickable and r.spills]
    lines += [f"{len(rows)} compiles; {len(problems)} problems; {len(spilling)} pickable configs spill.", ""]
    if problems:
        lines += ["## Problems", ""]
        lines += [f"- {r.arch} {r.dtype} d{r.head_dim} {r.mode} {r.shape} {r.label()}: {p}" if r else f"- {p}"
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
              "| arch | dtype | D | mode | shape | kernel | M | N | warps | stages | default | pickable | shared KB "
              "| regs | stack | spill st/ld | CTAs/SM | tma | cp.async | wgmma | mma |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shared = f"{r.shared_bytes / 1024:.0f}" if not r.error else "-"
        lines.append(
            f"| {r.arch} | {r.dtype} | {r.head_dim} | {r.mode} | {r.shape} | {r.kernel} | {r.block_m} | {r.block_n} | "
            f"{r.num_warps} | {r.num_stages} | {'yes' if r.default else ''} | {'yes' if r.pickable else 'no'} | "
            f"{shared} | {r.registers} | {r.stack_bytes} | {r.spill_store_bytes}/{r.spill_load_bytes} | "
            f"{r.ctas_per_sm} | {r.tma} | {r.cp_async} | {r.wgmma} | {r.mma if not r.error else r.error} |")
    return "\n".join(lines) + "\n"


def spill_target_misses(rows: list[Row]) -> list[str]:
    """The spill targets: no pickable config of a 16-bit kernel on sm_90 spills, at any head
    dim, in any mode, on any launch shape, and each such kernel has a pickable config that
    uses wgmma; no pickable config of the decode kernels spills, on either arch, in any
    dtype."""
    misses = []
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        decode = r.kernel in DECODE_KERNELS
        if r.pickable and decode and r.spills and r.arch != "sm_90":
            misses.append(f"{r.arch} {r.dtype} d{r.head_dim} {r.mode} {r.shape} {r.label()} spills "
                          f"{r.spill_store_bytes}/{r.spill_load_bytes} B")
        if r.arch == "sm_90" and (r.dtype in ("bf16", "fp16") or decode) and r.pickable:
            groups.setdefault((r.dtype, r.head_dim, r.mode, r.shape, r.kernel), []).append(r)
    for (dtype, head_dim, mode, shape, kernel), group in groups.items():
        misses += [f"sm_90 {dtype} d{head_dim} {mode} {shape} {r.label()} spills "
                   f"{r.spill_store_bytes}/{r.spill_load_bytes} B" for r in group if r.spills]
        # The decode kernels' 16- and 32-row tiles are under wgmma's 64 rows (they use
        # mma.sync): their work is reading the cache, not the products.
        if kernel not in DECODE_KERNELS and not any(r.mma_kind == "wgmma" for r in group):
            misses.append(f"sm_90 {dtype} d{head_dim} {mode} {shape} {kernel}: no config uses wgmma")
    return misses


# The kernels of the Hopper path: on sm_90 they read their tiles through tensor descriptors.
HOPPER_KERNELS = ("forward", "backward_prefix", "backward")


def structure_target_misses(rows: list[Row]) -> list[str]:
    """The structure targets of the Hopper path, in 16 bits on sm_90 from head dim
    TMA_MIN_HEAD_DIM: every pickable config of the forward and of the fused backward's
    kernels uses bulk tensor copies and wgmma, and holds at least as many CTAs per
    multiprocessor as the same config through pointers."""
    from llama_adapter_fast.kernels.utils import TMA_MIN_HEAD_DIM

    misses = []
    for r in rows:
        if not (r.arch == "sm_90" and r.dtype in ("bf16", "fp16") and r.pickable and r.kernel in HOPPER_KERNELS
                and r.head_dim >= TMA_MIN_HEAD_DIM):
            continue
        where = f"sm_90 {r.dtype} d{r.head_dim} {r.mode} {r.shape} {r.label()}"
        if r.tma == 0:
            misses.append(f"{where}: no bulk tensor copies")
        if r.wgmma == 0:
            misses.append(f"{where}: no wgmma")
        if r.pointer_ctas_per_sm > r.ctas_per_sm:
            misses.append(f"{where}: {r.ctas_per_sm} CTAs per SM, {r.pointer_ctas_per_sm} through pointers")
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
    p.add_argument("--kernels", default=",".join(KERNELS))
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"launch shapes, of {', '.join(SHAPES)} (default: all), or 'custom' for the one the "
                        "options below give")
    p.add_argument("--batch", type=int, default=Problem.B, help="with --shapes custom")
    p.add_argument("--q-heads", type=int, default=Problem.Hq, help="with --shapes custom")
    p.add_argument("--kv-heads", type=int, default=Problem.Hkv, help="with --shapes custom")
    p.add_argument("--seq-len", type=int, default=Problem.T, help="with --shapes custom")
    p.add_argument("--keys", type=int, default=None, help="with --shapes custom (default: --seq-len)")
    p.add_argument("--prefix-len", type=int, default=Problem.P, help="with --shapes custom")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, help="CSV path (default: benchmarks/results/compile-report-<date>.csv)")
    p.add_argument("--no-write", action="store_true", help="print the summary only")
    p.add_argument("--check", action="store_true", help="exit with status 1 on any problem")
    p.add_argument("--spill-targets", action="store_true", help="with --check, also fail on missed spill targets")
    p.add_argument("--structure-targets", action="store_true",
                   help="with --check, also fail on missed structure targets of the Hopper path (bulk tensor "
                        "copies, wgmma, CTAs per SM at least those of the same config through pointers, which "
                        "this compiles too)")
    args = p.parse_args(argv)
    if args.quick:
        args.archs, args.dtypes, args.head_dims, args.modes, args.shapes = "90", "bf16", "64,128,256", "causal", "base"
    custom = Problem(args.batch, args.q_heads, args.kv_heads, args.seq_len, args.prefix_len, args.keys)
    known = {**SHAPES, "custom": custom}
    unknown = [name for name in args.shapes.split(",") if name not in known]
    if unknown:
        p.error(f"--shapes: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    args.shapes = {name: known[name] for name in args.shapes.split(",")}
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    start = time.perf_counter()
    rows = sweep(archs, args.dtypes.split(","), [int(h) for h in args.head_dims.split(",")],
                 args.modes.split(","), args.shapes, tuple(args.kernels.split(",")), args.jobs,
                 compare_pointers=args.structure_targets)
    import triton

    title = f"Compile report (triton {triton.__version__}, {datetime.date.today()})"
    table = markdown(rows, title, args.shapes)
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
    if args.structure_targets:
        misses = structure_target_misses(rows)
        print("\n".join(["Structure targets missed:", *misses]) if misses else "Structure targets: all met.")
        problems += misses
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
